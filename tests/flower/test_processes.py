"""Flower's processes as Covey starts them: environment, connection file, node config."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from covey.flower.control import write_connection
from covey.flower.deploy import node_config_string, ray_tempdir
from covey.flower.processes import echo_new, flower_env, start_service

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


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_flower_logs_are_echoed_as_plain_text_when_not_on_a_terminal(tmp_path: Path) -> None:
    """Flower colours its log levels unconditionally; a file or pipe gets them without the
    escape codes, a terminal as they are. Only whole lines go out (no half escape code)."""
    log = tmp_path / "run.log"
    log.write_bytes(b"\x1b[92mINFO \x1b[0m:      Starting\n\x1b[93mWARN")
    piped, terminal = io.StringIO(), Terminal()
    mark = echo_new(log, 0, piped)
    assert piped.getvalue() == "INFO :      Starting\n"
    assert echo_new(log, 0, terminal) == mark
    assert terminal.getvalue() == "\x1b[92mINFO \x1b[0m:      Starting\n"
    with log.open("ab") as f:
        f.write(b"ING \x1b[0m: slow\n")
    echo_new(log, mark, piped)
    assert piped.getvalue() == "INFO :      Starting\nWARNING : slow\n"


@pytest.mark.slow  # a child process imports torch, transformers and PEFT
def test_model_loading_in_a_flower_process_prints_no_bars_or_warnings(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """What a ClientApp does first (load the base model, add LoRA) writes no progress bar and
    no library FutureWarning into Flower's logs."""
    code = (
        "from covey.config import load_recipe\n"
        "from covey.model.loading import load_base_model\n"
        "from covey.model.lora import wrap_with_lora\n"
        f"cfg = load_recipe(None, ['model.base={json.dumps(str(tiny_model_dir))}'])\n"
        "model, _ = load_base_model(cfg.model)\n"
        "wrap_with_lora(model, cfg.lora)\n"
        "print('loaded')\n"
    )
    service = start_service("load", [sys.executable, "-c", code], tmp_path, flower_env(tmp_path))
    service.process.wait(300)
    service.stop()
    text = service.log.read_text()
    assert text.rstrip().endswith("loaded"), text
    assert "Loading weights" not in text and "\r" not in text, text
    assert "Warning" not in text, text
