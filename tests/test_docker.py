"""docker/: the compose file against the compose-spec schema and the project's promises
(scripts/check_compose.py). No Docker engine is needed; nothing is built or started."""

from __future__ import annotations

import copy
import importlib.util
import pathlib
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "check_compose", ROOT / "scripts" / "check_compose.py"
)
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


def test_compose_is_valid():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_compose.py")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "valid against the compose-spec schema" in r.stdout


def test_schema_rejects_bad_files():
    doc = yaml.safe_load(check.COMPOSE.read_text())
    bad = copy.deepcopy(doc)
    bad["services"]["engine"]["ports"] = 8000
    bad["bogus"] = 1
    errs = check.schema_errors(bad)
    assert any("ports" in e for e in errs) and any("bogus" in e for e in errs)


def test_project_checks():
    doc = yaml.safe_load(check.COMPOSE.read_text())
    dockerfile = check.DOCKERFILE.read_text()
    assert check.project_errors(doc, dockerfile) == []
    bad = copy.deepcopy(doc)
    bad["services"]["engine"]["ports"] = ["8000:8000"]
    bad["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] = "broker"
    errs = check.project_errors(bad, dockerfile.replace(".[serve,confluent]", "."))
    assert any("127.0.0.1" in e for e in errs)
    assert any("KRaft" in e for e in errs)
    assert any("serve extra" in e for e in errs)
    assert any("confluent extra" in e for e in errs)
