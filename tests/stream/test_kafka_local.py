"""``scripts/kafka-local``: two brokers started at once, on other ports and data dirs,
with a cold jar cache: the cache is filled once, under a lock, and both start."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from tests import kafka_broker


def _free_port_pair(taken: set[int]) -> int:
    """A port P with P + 1 (its controller) free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 1 > 65535 or {port, port + 1} & taken:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise AssertionError("no two free adjacent ports")


def test_two_cold_starts_at_once_fill_the_jar_cache_once_and_both_run(tmp_path: Path):
    home = tmp_path / "jar-cache"  # cold: nothing fetched yet
    ports: list[int] = []
    for _ in range(2):
        ports.append(_free_port_pair({p + d for p in ports for d in (0, 1)}))
    envs = [
        {
            **os.environ,
            "STREAMLMM_KAFKA_HOME": str(home),
            "STREAMLMM_KAFKA_PORT": str(port),
            "STREAMLMM_KAFKA_DATA": str(tmp_path / f"data-{port}"),
            "STREAMLMM_KAFKA_HEAP_OPTS": "-Xms64m -Xmx256m",
        }
        for port in ports
    ]
    script = str(kafka_broker.SCRIPT)
    starts = [
        subprocess.Popen(
            [script, "start"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for env in envs
    ]
    try:
        outs = [p.communicate(timeout=900) for p in starts]
        for p, (out, err) in zip(starts, outs):
            assert p.returncode == 0, out + err
            assert "ClassNotFoundException" not in out + err
        fills = sum(out.count("fetching Kafka jars") for out, _ in outs)
        assert fills == 1  # one start filled the cache; the other waited for it
        for env in envs:
            status = subprocess.run([script, "status"], env=env, capture_output=True, text=True)
            assert status.returncode == 0, status.stdout + status.stderr
    finally:
        for env in envs:
            subprocess.run([script, "stop"], env=env, capture_output=True, timeout=180)
