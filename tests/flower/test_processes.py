"""Flower's processes as Covey starts them: environment, connection file, node config."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from covey.flower.control import write_connection
from covey.flower.deploy import node_config_string, ray_tempdir
from covey.flower.processes import flower_env, start_service

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_node_config_string_and_connection_file(tmp_path: Path) -> None:
    text = node_config_string({"data-file": "/a b/client_0.jsonl", "client-index": "0"})
    assert text == 'data-file="/a b/client_0.jsonl" client-index=0'
    write_connection(tmp_path, "10.0.0.5:8000", tmp_path / "ca.crt")
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["superlink"]["default"] == "covey"
    assert config["superlink"]["covey"]["address"] == "10.0.0.5:8000"
    assert config["superlink"]["covey"]["root-certificates"] == str(tmp_path / "ca.crt")
    env = flower_env(tmp_path)
    assert env["FLWR_HOME"] == str(tmp_path.resolve())
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def environment_of_a_flower_process(home: Path) -> dict[str, str]:
    """The environment a process started as Covey starts Flower's processes actually sees."""
    code = "import json, os; print(json.dumps(dict(os.environ)))"
    service = start_service("env", [sys.executable, "-c", code], home, flower_env(home))
    service.process.wait(30)
    service.stop()
    env: dict[str, str] = json.loads(service.log.read_text())
    return env


def test_flower_processes_get_none_of_coveys_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COVEY_PRIVATE_KEY", "11" * 32)
    monkeypatch.setenv("COVEY_SERVE_AUTH", "admin:hunter2")
    monkeypatch.setenv("COVEY_SOMETHING_ELSE", "kept")
    env = environment_of_a_flower_process(tmp_path)
    assert "COVEY_PRIVATE_KEY" not in env and "COVEY_SERVE_AUTH" not in env
    assert env["COVEY_SOMETHING_ELSE"] == "kept"
    assert env["FLWR_HOME"] == str(tmp_path.resolve())


def test_rays_folder_is_fresh_owner_only_short_and_removed() -> None:
    """Ray's temporary folder: a new unpredictable name (nobody can plant it in /tmp first),
    mode 0700, short enough for Ray's Unix sockets, and gone afterwards."""
    with ray_tempdir() as first, ray_tempdir() as second:
        assert first != second
        for folder in (first, second):
            info = folder.stat()
            assert folder.is_dir() and stat.S_IMODE(info.st_mode) == 0o700
            assert info.st_uid == os.getuid()
            assert len(str(folder)) <= 40
        (first / "session").mkdir()
    assert not first.exists() and not second.exists()
