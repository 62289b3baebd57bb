"""Loading and validating instruction records: formats, renames and every bad-input case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from covey.data.records import UNCATEGORIZED, load_records, parse_field_map
from covey.errors import DataError
from tests.conftest import dolly_records, write_records


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_format_loads_the_same_records(tmp_path: Path, suffix: str) -> None:
    records = dolly_records(3)
    dataset = load_records(write_records(tmp_path / f"d{suffix}", records))
    assert dataset.format == "dolly"
    assert [(r.instruction, r.context, r.response, r.category) for r in dataset.records] == [
        (r["instruction"], r["context"], r["response"], r["category"]) for r in records
    ]
    assert [r.id for r in dataset.records] == list(range(len(records)))
    assert len(dataset.sha256) == 64


def test_alpaca_format_is_detected_and_renamed(tmp_path: Path) -> None:
    path = write_records(
        tmp_path / "a.json",
        [{"instruction": "Add 2 and 2.", "input": "", "output": "4"},
         {"instruction": "Translate.", "input": "bonjour", "output": "hello"}],
    )  # fmt: skip
    dataset = load_records(path)
    assert dataset.format == "alpaca"
    first, second = dataset.records
    assert (first.response, first.context, first.category) == ("4", "", UNCATEGORIZED)
    assert (second.context, second.response) == ("bonjour", "hello")


def test_field_map_renames_other_formats(tmp_path: Path) -> None:
    path = write_records(
        tmp_path / "q.jsonl", [{"question": "Why?", "answer": "Because.", "topic": "t"}]
    )
    dataset = load_records(
        path, parse_field_map(["question=instruction", "answer=response", "topic=category"])
    )
    (record,) = dataset.records
    assert (record.instruction, record.response, record.category, record.context) == (
        "Why?", "Because.", "t", "",
    )  # fmt: skip


def test_missing_or_blank_category_becomes_uncategorized(tmp_path: Path) -> None:
    path = write_records(
        tmp_path / "d.jsonl",
        [{"instruction": "a", "response": "b"},
         {"instruction": "c", "response": "d", "category": "  "},
         {"instruction": "e", "response": "f", "category": None, "context": None}],
    )  # fmt: skip
    assert {r.category for r in load_records(path).records} == {UNCATEGORIZED}


def _error(path: Path, *maps: str) -> str:
    with pytest.raises(DataError) as info:
        load_records(path, parse_field_map(maps))
    return str(info.value)


def test_invalid_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a",\n')
    message = _error(path)
    assert "bad.jsonl" in message and "line 2" in message and "invalid JSON" in message


def test_invalid_json_list_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "response": "b"},\n  {"instruction": }\n]')
    message = _error(path)
    assert "line 3" in message and "column" in message


def test_json_that_is_not_a_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"instruction": "a", "response": "b"}))
    assert "expected a JSON list" in _error(path)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"instruction": "a", "context": ""}, "missing required field 'response'"),
        ({"instruction": "", "response": "b"}, "field 'instruction' is empty"),
        ({"instruction": "a", "response": "   "}, "field 'response' is empty"),
        ({"instruction": "a", "response": 42}, "field 'response' must be a string, got int"),
        ({"instruction": ["a"], "response": "b"}, "field 'instruction' must be a string, got list"),
        ({"instruction": "a", "response": "b", "context": 1.5}, "field 'context' must be a string"),
        ({"instruction": "a", "response": "b", "category": 3}, "field 'category' must be a string"),
    ],
)
def test_bad_fields_name_the_record_and_field(tmp_path: Path, record: dict, expected: str) -> None:
    good = {"instruction": "x", "response": "y", "category": "c"}
    path = write_records(tmp_path / "d.jsonl", [good, good | {"instruction": "z"}, record])
    message = _error(path)
    assert "d.jsonl" in message and "line 3" in message and expected in message


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    records = [{"instruction": f"q{i}", "response": ""} for i in range(15)]
    records[0]["response"] = "ok"
    message = _error(write_records(tmp_path / "d.json", records))
    assert "14 problem(s)" in message and "record [1]" in message and "and 4 more" in message


def test_non_object_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n["not", "an", "object"]\n')
    assert "line 2: expected an object" in _error(path)


def test_non_utf8_text_names_line_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(
        b'{"instruction": "a", "response": "b"}\n{"instruction": "caf\xe9", "response": "b"}\n'
    )
    message = _error(path)
    assert "line 2" in message and "not valid UTF-8" in message and "0xe9" in message


def test_unknown_format_suggests_map(tmp_path: Path) -> None:
    path = write_records(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    message = _error(path)
    assert "cannot tell the format" in message and "--map" in message and "question" in message


def test_map_onto_an_existing_field_is_refused(tmp_path: Path) -> None:
    path = write_records(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b", "text": "c"}])
    assert "already has a field 'response'" in _error(path, "text=response")


@pytest.mark.parametrize("bad", ["noequals", "=new", "old=", "a=b,a=c"])
def test_malformed_map_is_refused(bad: str) -> None:
    with pytest.raises(DataError, match="--map"):
        parse_field_map(bad.split(","))


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    assert "no records" in _error(path)


def test_csv_row_with_extra_cells_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("instruction,response\na,b\nc,d,e\n")
    assert "line 3: more cells than the header" in _error(path)


def test_corrupt_parquet_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    assert "cannot read as Parquet" in _error(path)


def test_unsupported_suffix_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("hello")
    assert "unsupported file type .txt" in _error(path)
    assert "no such file" in _error(tmp_path / "missing.jsonl")


def test_hub_id_offline_says_to_pass_a_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # the real hub client, told it is offline (as it is on machines with no hub access)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        load_records("someone/some-dataset")
    message = str(info.value)
    assert "someone/some-dataset" in message and "--input path/to/data.jsonl" in message
