"""Helpers for tests that need the local Kafka broker (``scripts/kafka-local``).

The broker is a real single-node Apache Kafka 4.x (KRaft) bound to 127.0.0.1.
These helpers only drive the script; they hold no state of their own, so the
broker outlives the test session unless a test stops it.

Notes
-----
The port comes from ``STREAMLMM_KAFKA_PORT`` (default 9092); every other
setting of ``scripts/kafka-local`` (data dir, jar cache, timeouts) is read
from the environment by the script itself, which this module passes through.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = [
    "SCRIPT",
    "bootstrap",
    "ensure_running",
    "is_running",
    "start_broker",
    "stop_broker",
]

#: Absolute path of the broker control script.
SCRIPT: Path = Path(__file__).resolve().parent.parent / "scripts" / "kafka-local"

# Generous: a first start on a fresh machine downloads ~45 MB of jars from
# Maven Central before the broker's own (<= 120 s) readiness wait.
_START_TIMEOUT_S = 600.0
_STOP_TIMEOUT_S = 120.0


def bootstrap() -> str:
    """Return the bootstrap servers string of the local broker.

    Returns
    -------
    str
        ``"127.0.0.1:<port>"`` with the port from ``STREAMLMM_KAFKA_PORT``
        (default 9092).
    """
    port = os.environ.get("STREAMLMM_KAFKA_PORT", "9092").strip() or "9092"
    return f"127.0.0.1:{int(port)}"


def _run(command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/kafka-local <command>`` and return the finished process.

    Parameters
    ----------
    command : str
        Sub-command of the script (``start``, ``stop``, ``status``, ...).
    timeout : float
        Seconds before the call is abandoned with ``subprocess.TimeoutExpired``.

    Returns
    -------
    subprocess.CompletedProcess[str]
        The finished process, stdout and stderr captured as text.
    """
    return subprocess.run(
        [str(SCRIPT), command],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _checked(command: str, timeout: float) -> None:
    """Run a script sub-command and raise if it fails.

    Parameters
    ----------
    command : str
        Sub-command of ``scripts/kafka-local``.
    timeout : float
        Seconds to allow for it.

    Raises
    ------
    RuntimeError
        If the script exits non-zero; the message holds its output, which for
        a failed start includes the tail of the broker log.
    """
    proc = _run(command, timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"scripts/kafka-local {command} failed with exit code {proc.returncode}:\n"
            f"{proc.stdout}{proc.stderr}"
        )


def ensure_running() -> str:
    """Start the local broker unless it is already up, and wait until it is ready.

    Idempotent and cheap when the broker is running (one metadata round trip).

    Returns
    -------
    str
        The bootstrap servers string, as :func:`bootstrap` returns it.

    Raises
    ------
    RuntimeError
        If the broker cannot be started or does not become ready in time.
    """
    _checked("start", _START_TIMEOUT_S)
    return bootstrap()


def start_broker() -> str:
    """Start the broker again, e.g. after :func:`stop_broker` in an outage test.

    Storage and topics from before the stop are kept.

    Returns
    -------
    str
        The bootstrap servers string.

    Raises
    ------
    RuntimeError
        If the broker cannot be started or does not become ready in time.
    """
    return ensure_running()


def stop_broker() -> None:
    """Stop the broker started by ``scripts/kafka-local`` (no-op if not running).

    The broker gets SIGTERM and, if still alive after the script's stop
    timeout, SIGKILL. Only the process recorded in the script's pid file is
    signalled.

    Raises
    ------
    RuntimeError
        If the script fails.
    """
    _checked("stop", _STOP_TIMEOUT_S)


def is_running() -> bool:
    """Tell whether the local broker is up and answering metadata requests.

    Returns
    -------
    bool
        True if ``scripts/kafka-local status`` exits 0.
    """
    return _run("status", 30.0).returncode == 0
