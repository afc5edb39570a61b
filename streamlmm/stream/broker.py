"""Whether a Kafka broker listens at all: a clear error within seconds.

Without a broker, the clients retry for a minute or more (kafka-python about 30 s,
then ``KafkaTimeoutError: Unable to bootstrap``; confluent-kafka's metadata wait, then
"topic not found") and log a line per attempt. Every component that connects (the
engine's source and transactional producer, the scale-out worker, the fitter, the
state-topic query view, the simulator) first waits at most :data:`BROKER_WAIT_S` for a
TCP connection to one of the bootstrap servers, and otherwise stops with
"no broker at HOST:PORT". A broker that is there but slow to answer is the clients'
business, as before. ``STREAMLMM_BROKER_WAIT_SECONDS`` sets the wait (e.g. longer for
a broker that a supervisor starts together with the engine).

"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["BROKER_WAIT_S", "wait_for_broker", "bootstrap_servers"]

BROKER_WAIT_S = 10.0  # a broker restarting under a supervisor is back within this


def bootstrap_servers(bootstrap: str) -> list[tuple[str, int]]:
    """``(host, port)`` of each server of a ``HOST:PORT[,HOST:PORT...]`` string.

    >>> bootstrap_servers("127.0.0.1:9092,[::1]:9093,kafka:19092")
    [('127.0.0.1', 9092), ('::1', 9093), ('kafka', 19092)]
    >>> bootstrap_servers("127.0.0.1")
    Traceback (most recent call last):
    ...
    ValueError: bootstrap server '127.0.0.1' is not HOST:PORT

    """
    out = []
    for item in str(bootstrap).split(","):
        item = item.strip()
        if "://" in item:  # PLAINTEXT://host:port, as some settings are written
            item = item.split("://", 1)[1]
        host, _, port = item.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bootstrap server {item!r} is not HOST:PORT")
        out.append((host, int(port)))
    return out


def wait_for_broker(bootstrap: str, timeout_s: float | None = None) -> None:
    """Return once one of the bootstrap servers accepts a TCP connection; after
    ``timeout_s`` (default :data:`BROKER_WAIT_S`, or ``$STREAMLMM_BROKER_WAIT_SECONDS``)
    without one, ``RuntimeError("no broker at ...")`` with the last reason.

    >>> wait_for_broker("127.0.0.1:1", timeout_s=0.2)
    Traceback (most recent call last):
    ...
    RuntimeError: no broker at 127.0.0.1:1: Connection refused (tried for 0.2 s)

    """
    if timeout_s is None:
        timeout_s = _wait_setting()
    servers = bootstrap_servers(bootstrap)
    deadline = time.monotonic() + timeout_s
    why = "no answer"
    while True:
        for host, port in servers:
            left = max(0.05, min(2.0, deadline - time.monotonic()))
            try:
                with socket.create_connection((host, port), timeout=left):
                    return
            except socket.gaierror as e:
                why = f"{host} does not resolve ({e.strerror})"
            except OSError as e:
                why = e.strerror or type(e).__name__
        if time.monotonic() >= deadline:
            raise RuntimeError(f"no broker at {bootstrap}: {why} (tried for {timeout_s:g} s)")
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


def _wait_setting() -> float:
    text = os.environ.get("STREAMLMM_BROKER_WAIT_SECONDS")
    if not text:
        return BROKER_WAIT_S
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v >= 0:
        raise ValueError(f"STREAMLMM_BROKER_WAIT_SECONDS must be a number >= 0, got {text!r}")
    return v
