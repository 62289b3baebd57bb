"""Flower's processes as Covey starts them: environment, connection file, node config."""

from __future__ import annotations

import sys
from pathlib import Path

from covey.flower.control import write_connection
from covey.flower.deploy import node_config_string
from covey.flower.processes import flower_env

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
    assert len(env["RAY_TMPDIR"]) <= 40
