"""The run folder's format: run folders written before `covey.fed.runfolder` existed still load,
and the typed round record writes the same JSON back.

`fixtures/run_before_runfolder` was written by the code before this module: rounds 0 and 1 of a
tiny krum run (`fed.rounds=1` at the time, so metrics.jsonl holds those two), and a round 2
written with FLock's and Flower's engine parts at the top level of round.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from covey.errors import DataError
from covey.fed import runfolder
from covey.fed.report import rounds_table
from covey.fed.runfolder import RoundRecord

OLD_RUN = Path(__file__).parent / "fixtures" / "run_before_runfolder"


def test_every_old_round_json_reads_typed_and_writes_back_the_same_bytes() -> None:
    assert runfolder.complete_rounds(OLD_RUN) == [0, 1, 2]
    for index in (0, 1, 2):
        text = (runfolder.round_dir(OLD_RUN, index) / runfolder.ROUND_RECORD).read_text()
        record = RoundRecord.from_dict(json.loads(text))
        assert record.to_json() == text
        assert runfolder.read_record(OLD_RUN, index) == record


def test_old_rounds_load_with_their_adapter_and_engine_parts() -> None:
    state, server, first = runfolder.load_round(OLD_RUN, 1)  # checks the content hash
    assert server == {} and state and all(isinstance(t, torch.Tensor) for t in state.values())
    assert first.round == 1 and first.selected == [0, 1, 2] and len(first.clients) == 3
    assert first.aggregation["kept"] == [True, False, False]  # what krum kept
    assert first.eval["rouge_examples"] == 2 and first.engine == {}
    _, _, second = runfolder.load_round(OLD_RUN, 2)
    assert set(second.engine) == {"flock", "nodes", "failed"}
    assert second.engine["nodes"] == {"0": 1000, "2": 1002}
    assert second.rejected == [
        {"client": 2, "reason": "proposal rejected by the vote", "attacker": True}
    ]
    assert second.seconds["vote"] == 0.2


def test_metrics_lines_are_the_ones_the_old_code_wrote() -> None:
    records = [runfolder.read_record(OLD_RUN, k) for k in (0, 1)]
    expected = (OLD_RUN / runfolder.METRICS).read_text()
    assert "\n".join(r.metrics_line() for r in records) + "\n" == expected


def test_a_round_rewritten_from_its_record_is_the_same_round(tmp_path: Path) -> None:
    """write_round hashes the adapter bytes it is given and returns the record as saved."""
    old = runfolder.round_dir(OLD_RUN, 2)
    record = runfolder.read_record(OLD_RUN, 2)
    files = {
        name: (old / name).read_bytes()
        for name in (runfolder.ADAPTER_WEIGHTS, runfolder.ADAPTER_CONFIG)
    }
    unhashed = RoundRecord.from_dict(record.to_dict() | {"adapter_sha256": ""})
    config = (old / runfolder.CONFIG).read_text()
    saved = runfolder.write_round(tmp_path, unhashed, files, {}, config)
    assert saved == record == runfolder.read_record(tmp_path, 2, check_hash=True)
    written = (runfolder.round_dir(tmp_path, 2) / runfolder.ROUND_RECORD).read_text()
    assert written == (old / runfolder.ROUND_RECORD).read_text()


def test_a_saved_record_reads_as_json_does(tmp_path: Path) -> None:
    """What write_round returns is what a reader of round.json sees (tuples are lists, keys
    strings), though it reads nothing back."""
    files = {runfolder.ADAPTER_WEIGHTS: b"weights", runfolder.ADAPTER_CONFIG: b"{}"}
    record = RoundRecord(round=1, selected=[0], engine={"nodes": {0: 1000}, "span": (1, 2)})
    saved = runfolder.write_round(tmp_path, record, files, {}, "")
    assert saved.engine == {"nodes": {"0": 1000}, "span": [1, 2]}
    assert saved == runfolder.read_record(tmp_path, 1, check_hash=True)
    assert saved.adapter_sha256 == runfolder.content_hash(b"weights")


def test_a_changed_adapter_or_a_broken_record_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    weights = runfolder.round_dir(run, 1) / runfolder.ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="content hash does not match"):
        runfolder.load_round(run, 1)
    assert runfolder.read_record(run, 1).round == 1  # the record alone is still readable
    record = runfolder.round_dir(run, 2) / runfolder.ROUND_RECORD
    record.write_text("{not json")
    with pytest.raises(DataError, match=r"round_002/round\.json: unreadable round record"):
        runfolder.read_record(run, 2)
    record.write_text('{"selected": []}')
    with pytest.raises(DataError, match=r"round_002/round\.json: not a round record"):
        runfolder.read_record(run, 2)


def test_engine_parts_may_not_overwrite_the_records_own_keys() -> None:
    with pytest.raises(ValueError, match=r"engine parts \['eval'\]"):
        RoundRecord(round=1, engine={"eval": {}}).to_dict()


def test_the_rounds_table_reads_typed_records() -> None:
    records = [runfolder.read_record(OLD_RUN, k) for k in (0, 1, 2)]
    table = rounds_table(records)
    assert table.row_count == 3
    assert [str(c) for c in table.columns[0]._cells] == ["0", "1", "2"]


def test_an_old_run_folder_resumes_after_its_last_round(tmp_path: Path) -> None:
    """Resuming checks the settings against the old round 0's config.toml, then continues
    from round 2's adapter with every old record (no model is needed for that part)."""
    from safetensors.torch import load_file

    from covey.config import load_recipe
    from covey.fed.rounds import RunFolder

    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    cfg = load_recipe(run / runfolder.CONFIG, [f"run.out='{run}'", "fed.rounds=3"])
    folder = RunFolder.check(cfg, resume=True)
    state, server = folder.begin(None)  # type: ignore[arg-type]  # a resume loads no model
    assert folder.done == [0, 1, 2] and folder.next_round == 3 and server == {}
    assert folder.records == [runfolder.read_record(OLD_RUN, k) for k in (0, 1, 2)]
    weights = load_file(str(runfolder.round_dir(OLD_RUN, 2) / runfolder.ADAPTER_WEIGHTS))
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
