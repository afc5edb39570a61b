"""Engine settings from flags, ``STREAMLMM_*`` environment variables and a TOML file.

Precedence: command-line flag > environment > config file > default. Kafka client
settings (SASL/SSL and a few client options) come only from the file's ``[kafka]``
table or ``STREAMLMM_KAFKA__<NAME>`` variables, are passed to kafka-python unchanged,
and are never logged.

"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from typing import Any

from streamlmm.stream.engine import EngineConfig, parse_levels

__all__ = ["load_config", "load_kafka_settings", "KAFKA_CLIENT_KEYS", "ENV_PREFIX"]

ENV_PREFIX = "STREAMLMM_"
KAFKA_CLIENT_KEYS = frozenset(
    {
        "security_protocol",
        "sasl_mechanism",
        "sasl_plain_username",
        "sasl_plain_password",
        "sasl_kerberos_service_name",
        "sasl_kerberos_domain_name",
        "ssl_cafile",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "ssl_crlfile",
        "ssl_check_hostname",
        "client_id",
        "request_timeout_ms",
        "api_version_auto_timeout_ms",
    }
)
_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a string from the environment into the field's type."""
    if not isinstance(value, str):
        return value
    ftype = str(_FIELDS[name].type)
    if "bool" in ftype:
        v = value.strip().lower()
        if v not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
            raise ValueError(f"{ENV_PREFIX}{name.upper()}: expected true or false, got {value!r}")
        return v in ("1", "true", "yes", "on")
    try:
        if ftype.startswith("int"):
            return int(value)
        if "float" in ftype:
            return float(value)
    except ValueError:
        kind = "an integer" if ftype.startswith("int") else "a number"
        raise ValueError(f"{ENV_PREFIX}{name.upper()}: expected {kind}, got {value!r}") from None
    return value


def _kafka_settings(file_kafka: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    out = dict(file_kafka)
    for k, v in env.items():
        if k.startswith(ENV_PREFIX + "KAFKA__"):
            out[k[len(ENV_PREFIX + "KAFKA__") :].lower()] = v
    unknown = set(out) - KAFKA_CLIENT_KEYS
    if unknown:
        raise ValueError(f"unsupported kafka client settings: {sorted(unknown)}")
    for k in ("request_timeout_ms", "api_version_auto_timeout_ms"):
        if k in out:
            out[k] = int(out[k])
    if "ssl_check_hostname" in out and isinstance(out["ssl_check_hostname"], str):
        out["ssl_check_hostname"] = out["ssl_check_hostname"].lower() in ("1", "true", "yes")
    return out


def load_kafka_settings(path: str | None = None) -> dict[str, Any]:
    """Kafka client settings (security) alone: the config file's ``[kafka]`` table
    (``path`` or ``$STREAMLMM_CONFIG``) and the ``STREAMLMM_KAFKA__<NAME>`` variables, as
    ``streamlmm run`` reads them (for ``fit``, ``serve`` and the workers)."""
    path = path or os.environ.get(ENV_PREFIX + "CONFIG")
    file_kafka: dict[str, Any] = {}
    if path:
        with open(path, "rb") as fh:
            file_kafka = tomllib.load(fh).get("kafka", {})
    return _kafka_settings(file_kafka, os.environ)


def load_config(
    flags: Mapping[str, Any], env: Mapping[str, str] | None = None, path: str | None = None
) -> EngineConfig:
    """Merge the sources of settings into an :class:`EngineConfig`.

    Examples
    --------
    >>> cfg = load_config(
    ...     {"source": "jsonl:-", "snapshot_every_events": None},
    ...     env={"STREAMLMM_FORMULA": "y ~ x + (1 | g)", "STREAMLMM_SNAPSHOT_DIR": "/tmp/s",
    ...          "STREAMLMM_SNAPSHOT_EVERY_EVENTS": "500"})
    >>> cfg.formula, cfg.snapshot_every_events, cfg.method
    ('y ~ x + (1 | g)', 500, 'REML')

    """
    env = os.environ if env is None else env
    path = path or env.get(ENV_PREFIX + "CONFIG")
    file_cfg: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                file_cfg = tomllib.load(fh)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {path}: {e}") from None
    file_kafka = file_cfg.pop("kafka", {})
    merged: dict[str, Any] = {}
    for name in _FIELDS:
        if name == "kafka":
            continue
        if flags.get(name) is not None:
            merged[name] = flags[name]
        elif ENV_PREFIX + name.upper() in env:
            merged[name] = _coerce(name, env[ENV_PREFIX + name.upper()])
        elif name in file_cfg:
            merged[name] = file_cfg.pop(name)
    unknown = set(file_cfg) - set(_FIELDS)
    if unknown:
        raise ValueError(f"unknown settings in {path}: {sorted(unknown)}")
    missing = [n for n in ("source", "formula", "snapshot_dir") if n not in merged]
    if missing:
        raise ValueError(
            "missing required settings: "
            + ", ".join(f"--{m.replace('_', '-')} (or {ENV_PREFIX}{m.upper()})" for m in missing)
        )
    if merged.get("half_life") is not None and merged.get("time_key") is None:
        merged["time_key"] = "ts"
    _check(merged)
    return EngineConfig(**merged, kafka=_kafka_settings(file_kafka, env))


_CHOICES = {
    "method": ("REML", "ML"),
    "missing": ("raise", "skip"),
    "kafka_client": ("auto", "kafka-python", "confluent-kafka"),
}
_POSITIVE = (
    "snapshot_every_events",
    "snapshot_every_seconds",
    "max_poll_records",
    "max_message_bytes",
    "keep_snapshots",
    "em_every",
    "refit_every",
    "half_life",
)
_NON_NEGATIVE = ("stop_after_dead_letters", "progress_seconds")


def _check(merged: Mapping[str, Any]) -> None:
    """Settings that the engine would reject later, rejected here with the flag's name."""
    for name, choices in _CHOICES.items():
        if name in merged and merged[name] not in choices:
            raise ValueError(
                f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                f"got {merged[name]!r}"
            )
    for name in _POSITIVE:
        v = merged.get(name)
        if v is not None and not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {v!r}")
    hl = merged.get("half_life")
    if hl is not None and not math.isfinite(hl):
        raise ValueError(f"--half-life must be a finite number > 0, got {hl!r}")
    if "consumer_group" in merged and not str(merged["consumer_group"]).strip():
        raise ValueError("--consumer-group must not be empty")
    if merged.get("levels"):
        parse_levels(merged["levels"])  # checked now, not only when a model is made
    port = merged.get("serve")
    if port is not None and not (isinstance(port, int) and 0 <= port <= 65535):
        raise ValueError(f"--serve must be a port between 0 and 65535, got {port!r}")
    for name in _NON_NEGATIVE:
        v = merged.get(name)
        if v is not None and not (isinstance(v, (int, float)) and v >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {v!r}")
