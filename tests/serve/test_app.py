"""The Gradio app without a browser: its data, its answer handler, and its safety settings."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from covey.cli import app as commands_app
from covey.errors import ConfigError
from covey.model.generate import PRESETS, GenerationSettings
from covey.serve.app import (
    EMPTY_ANSWER,
    build_app,
    control_values,
    is_loopback,
    launch_app,
    load_examples,
    parse_auth,
    read_run_view,
)
from covey.serve.generate import BASE, TUNED, ServeSession


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the run tab ------------------------------------------------------------------------------


def test_run_view_shows_losses_and_every_clients_contribution(
    tiny_run: Path, tmp_path: Path
) -> None:
    view = read_run_view(tiny_run, tmp_path)
    assert view.loss_image == tiny_run / "loss.png"
    assert [row[0] for row in view.losses.rows] == [0, 1, 2]
    assert view.losses.rows[0][3] is None and isinstance(view.losses.rows[2][3], float)
    assert [(r[0], r[1], r[5]) for r in view.contributions.rows] == [
        (1, 0, "accepted"), (1, 1, "accepted"), (1, 2, "accepted"),
        (2, 0, "accepted"), (2, 1, "accepted"), (2, 2, "accepted"),
    ]  # fmt: skip
    assert all(r[2] > 0 for r in view.contributions.rows)  # samples per client
    assert view.flock is None and view.notes == []


def test_run_view_shows_rejections_flock_and_plots_a_missing_figure(
    run_copy: Path, tmp_path: Path
) -> None:
    (run_copy / "loss.png").unlink()
    record_path = run_copy / "round_002" / "round.json"
    record = json.loads(record_path.read_text())
    record["rejected"] = [{"client": 3, "reason": "update norm 9.1 > 5.0"}]
    record["flock"] = {  # the shape covey.flock.protocol writes (trimmed to what is shown)
        "proposers": [0, 1],
        "voters": [2],
        "proposals": [
            {"participant": 0, "accepted": True, "attacker": False},
            {"participant": 1, "accepted": False, "attacker": True},
        ],
        "votes": [{"participant": 2, "accepts": [True, False], "attacker": False}],
        "outcome": "accepted",
        "rewards": [{"participant": 0, "amount": 8.0}, {"participant": 2, "amount": 2.0}],
        "slashes": [{"participant": 1, "amount": 10.0}],
        "balances": [
            {"participant": 0, "attacker": False, "net": 8.0},
            {"participant": 1, "attacker": True, "net": -10.0},
            {"participant": 2, "attacker": False, "net": 2.0},
            {"participant": 3, "attacker": False, "net": 0.0},
        ],
    }
    record_path.write_text(json.dumps(record))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    view = read_run_view(run_copy, scratch)
    assert view.loss_image == scratch / "loss.png"
    assert view.loss_image.read_bytes()[:4] == b"\x89PNG"
    assert [2, 3, None, None, None, "rejected", "update norm 9.1 > 5.0"] in view.contributions.rows
    assert view.flock is not None
    assert view.flock.headers == [
        "round", "participant", "role", "attacker", "ballot / verdict", "reward", "slash", "net",
    ]  # fmt: skip
    assert view.flock.rows == [
        [2, 0, "proposer", "", "accepted", 8.0, None, 8.0],
        [2, 1, "proposer", "yes", "rejected", None, 10.0, -10.0],
        [2, 2, "voter", "", "+-", 2.0, None, 2.0],
        [2, 3, "-", "", "-", None, None, 0.0],
    ]


def test_examples_come_from_the_runs_held_out_test_set(session: ServeSession) -> None:
    examples = load_examples(session.source.cfg, limit=4)
    test_file = Path(session.source.cfg.data.dir) / "test.jsonl"
    instructions = {json.loads(line)["instruction"] for line in test_file.read_text().splitlines()}
    assert len(examples) == 4 and all(e[0] in instructions for e in examples)
    assert len({e[0] for e in examples}) == 4


# --- the compare tab --------------------------------------------------------------------------


def _respond(demo: Any) -> Any:
    (fn,) = [f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "respond"]
    return fn


def test_the_app_builds_with_both_panes_and_the_run_tab(
    session: ServeSession, tmp_path: Path
) -> None:
    view = read_run_view(session.source.run_dir or tmp_path, tmp_path)
    demo = build_app(session, GenerationSettings(), [["Say hi", ""]], view)
    ids = {c.get("props", {}).get("elem_id") for c in demo.config["components"]}
    assert {"base-chat", "tuned-chat", "instruction", "context", "send", "beams"} <= ids
    assert "contributions" in ids
    values = {c["props"].get("elem_id"): c["props"].get("value") for c in demo.config["components"]}
    assert (values["preset"], values["sample"], values["beams"], values["repetition-penalty"],
            values["max-new-tokens"]) == ("greedy", False, 1, 1.2, 128)  # fmt: skip
    assert "greedy preset: greedy decoding" in values["generation-settings"]


SAMPLED = GenerationSettings(sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6,
                             seed=3)  # fmt: skip


def test_one_message_streams_into_both_panes_at_once(session: ServeSession) -> None:
    respond = _respond(build_app(session, examples=[]))
    updates = list(respond("Name a bird.", "", [], [], *control_values(SAMPLED)))
    assert all(len(u) == 4 for u in updates)  # the panes and their states: the boxes keep
    # the instruction, so the question stays in view with its answers
    last = updates[-1]
    answers = list(session.stream("Name a bird.", "", SAMPLED, (BASE, TUNED)))[-1]
    base_answer, tuned_answer = (a or EMPTY_ANSWER for a in answers)
    assert last[0] == [
        {"role": "user", "content": "Name a bird."},
        {"role": "assistant", "content": base_answer},
    ]
    assert last[1][-1] == {"role": "assistant", "content": tuned_answer}
    assert last[2] == last[0] and last[3] == last[1]  # the histories kept for the next message
    # both panes grow together: some update shows text in both before the last one
    assert any(u[0][-1]["content"] != "…" and u[1][-1]["content"] != "…" for u in updates[1:-1])


def test_presets_set_the_controls_and_changes_are_named(session: ServeSession) -> None:
    demo = build_app(session, examples=[])
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values()}
    current = control_values(GenerationSettings(max_new_tokens=64))
    *values, text = fns["choose_preset"]("shepherd", *current)
    assert values == control_values(replace(PRESETS["shepherd"], max_new_tokens=64))
    assert text.startswith("shepherd preset: 4-beam search")
    assert fns["describe"](*values) == ("shepherd", text)
    values[4] = 2  # beams
    preset, text = fns["describe"](*values)
    assert preset == "custom" and text.startswith("custom settings: 2-beam search")


def test_bad_controls_and_empty_messages_are_shown_as_errors(session: ServeSession) -> None:
    import gradio as gr

    respond = _respond(build_app(session))
    with pytest.raises(gr.Error, match="Type an instruction"):
        list(respond("  ", "", [], [], *control_values(GenerationSettings())))
    with pytest.raises(gr.Error, match="top-p"):
        list(respond("Hi", "", [], [], *control_values(GenerationSettings(top_p=0.0))))


# --- safety -----------------------------------------------------------------------------------


def test_auth_comes_only_from_a_well_formed_variable() -> None:
    assert parse_auth(None) is None and parse_auth("") is None
    assert parse_auth("ada:s3cr:et") == ("ada", "s3cr:et")
    for bad in ("ada", ":pw", "ada:"):
        with pytest.raises(ConfigError, match="COVEY_SERVE_AUTH must be user:password"):
            parse_auth(bad)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")


def test_serve_flags_are_checked_before_any_model_loads(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COVEY_SERVE_AUTH", "no-colon")
    result = CliRunner().invoke(commands_app, ["serve", "--run", str(tiny_run)])
    assert isinstance(result.exception, ConfigError) and "COVEY_SERVE_AUTH" in str(result.exception)
    monkeypatch.delenv("COVEY_SERVE_AUTH")
    result = CliRunner().invoke(commands_app, ["serve", "--run", str(tiny_run), "--round", "5"])
    assert isinstance(result.exception, ConfigError)
    result = CliRunner().invoke(commands_app, ["serve", "--run", str(tiny_run), "--beams", "0"])
    assert isinstance(result.exception, ConfigError)
    result = CliRunner().invoke(commands_app, ["serve", "--run", str(tiny_run), "--preset", "x"])
    assert isinstance(result.exception, ConfigError) and "--preset" in str(result.exception)
    assert "--auth" not in CliRunner().invoke(commands_app, ["serve", "--help"]).output


def test_the_server_binds_loopback_and_requires_the_login(session: ServeSession) -> None:
    demo = build_app(session)
    local_url, share_url = launch_app(demo, port=free_port(), auth=("ada", "pw-123"))
    try:
        assert local_url.startswith("http://127.0.0.1:") and share_url is None
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(local_url + "config", timeout=30)
        assert refused.value.code == 401
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        wrong = urllib.parse.urlencode({"username": "ada", "password": "nope"}).encode()
        with pytest.raises(urllib.error.HTTPError):
            opener.open(local_url + "login", data=wrong, timeout=30)
        right = urllib.parse.urlencode({"username": "ada", "password": "pw-123"}).encode()
        assert opener.open(local_url + "login", data=right, timeout=30).status == 200
        assert opener.open(local_url + "config", timeout=30).status == 200
        # nothing phones home: analytics off by the app's own flag, and gradio's monitoring
        # dashboard (another app, whose analytics follow only the environment) is not served
        assert demo.analytics_enabled is False
        with pytest.raises(urllib.error.HTTPError) as monitoring:
            opener.open(local_url + "monitoring", timeout=30)
        assert monitoring.value.code == 403
    finally:
        demo.close()
