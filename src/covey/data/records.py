"""Instruction records: reading files or hub datasets, format detection and validation.

Every loader returns the same canonical `Record` (Dolly's field names), whatever the input:

| canonical     | Dolly         | Alpaca        | required                               |
|---------------|---------------|---------------|----------------------------------------|
| `instruction` | `instruction` | `instruction` | yes, non-empty string                  |
| `context`     | `context`     | `input`       | no (missing or null means "")          |
| `response`    | `response`    | `output`      | yes, non-empty string                  |
| `category`    | `category`    | `category`    | no (missing, null or "" means `uncategorized`) |

Other formats are renamed into one of these with `field_map` (the CLI's `--map old=new`).
Problems are collected over the whole file and reported together, each with its line (JSONL,
CSV), record index (JSON list) or row (Parquet), so one run shows everything to fix.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from covey.errors import DataError

UNCATEGORIZED = "uncategorized"
SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# Field renames that turn each known format into the canonical one.
FORMATS: dict[str, dict[str, str]] = {
    "dolly": {"instruction": "instruction", "context": "context", "response": "response"},
    "alpaca": {"instruction": "instruction", "input": "context", "output": "response"},
}
REQUIRED_FIELDS = ("instruction", "response")
_MAX_PROBLEMS_SHOWN = 10
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Record:
    """One instruction example in canonical form."""

    instruction: str
    context: str
    response: str
    category: str
    id: int
    """Position of the record in the file it was read from (0-based), kept for provenance."""

    def to_json(self) -> dict[str, Any]:
        return {
            "instruction": self.instruction,
            "context": self.context,
            "response": self.response,
            "category": self.category,
            "id": self.id,
        }


@dataclass(frozen=True)
class Dataset:
    """Records read from one source, with what is needed to cite that source."""

    records: list[Record]
    source: str
    """The path or hub id as given."""
    sha256: str
    """Hash of the source bytes (for a hub dataset: of its data files' hashes in order)."""
    format: str
    """`dolly` or `alpaca`, as detected after renaming."""


def parse_field_map(items: Iterable[str]) -> dict[str, str]:
    """Turn `["old=new", ...]` (the CLI's repeated `--map`) into a rename mapping."""
    mapping: dict[str, str] = {}
    for item in items:
        old, sep, new = item.partition("=")
        old, new = old.strip(), new.strip()
        if not sep or not old or not new:
            raise DataError(
                f"--map {item!r}: expected old=new, for example --map question=instruction"
            )
        if old in mapping:
            raise DataError(f"--map {item!r}: field {old!r} is already renamed to {mapping[old]!r}")
        mapping[old] = new
    return mapping


def load_records(source: str | Path, field_map: Mapping[str, str] | None = None) -> Dataset:
    """Read and validate instruction records from a file or a Hugging Face dataset id.

    Files: `.json` (a list of objects), `.jsonl`, `.csv`, `.parquet`. A string that is not an
    existing path but looks like `owner/name` is fetched from the Hugging Face hub.
    """
    field_map = dict(field_map or {})
    path = Path(source)
    if path.exists():
        raw = read_raw_records(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return _validate(raw, str(source), digest, field_map)
    if isinstance(source, str) and _HUB_ID.match(source) and path.suffix not in SUPPORTED_SUFFIXES:
        return _load_hub_dataset(source, field_map)
    raise DataError(
        f"{source}: no such file. Pass a {'/'.join(SUPPORTED_SUFFIXES)} file, "
        "or a Hugging Face dataset id such as databricks/databricks-dolly-15k"
    )


def read_raw_records(path: Path) -> list[tuple[str, Any]]:
    """Read `path` into `(where, record)` pairs, where `where` locates the record for messages."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'}; "
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    text = _decode_utf8(path)
    if suffix == ".jsonl":
        return _read_jsonl(path, text)
    if suffix == ".json":
        return _read_json_list(path, text)
    return _read_csv(path, text)


def _decode_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path}: line {line}, column {column}: not valid UTF-8 (byte 0x{data[e.start]:02x}); "
            "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT"
        ) from None
    return text.removeprefix("\ufeff")  # a byte-order mark is legal UTF-8 but not JSON


def _read_jsonl(path: Path, text: str) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(f"line {number}, column {e.colno}: invalid JSON ({e.msg})")
    _raise_if(problems, path)
    return rows


def _read_json_list(path: Path, text: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})"
        ) from None
    if not isinstance(data, list):
        hint = " (one object per line? name the file .jsonl)" if isinstance(data, dict) else ""
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}{hint}")
    return [(f"record [{i}]", item) for i, item in enumerate(data)]


def _read_csv(path: Path, text: str) -> list[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[tuple[str, Any]] = []
    problems: list[str] = []
    try:
        for row in reader:
            where = f"line {reader.line_num}"
            if None in row:  # DictReader files extra cells under the key None
                problems.append(f"{where}: more cells than the header has columns")
                continue
            rows.append((where, row))
    except csv.Error as e:
        problems.append(f"line {reader.line_num}: {e}")
    _raise_if(problems, path)
    return rows


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read as Parquet ({e})") from None
    return [(f"row {i}", item) for i, item in enumerate(table.to_pylist())]


def _validate(
    raw: Sequence[tuple[str, Any]], source: str, digest: str, field_map: Mapping[str, str]
) -> Dataset:
    if not raw:
        raise DataError(f"{source}: no records found; the file is empty")
    problems: list[str] = []
    renamed: list[tuple[str, dict[str, Any]]] = []
    for where, item in raw:
        if not isinstance(item, dict):
            problems.append(
                f"{where}: expected an object with named fields, got {type(item).__name__}"
            )
            continue
        renamed.append((where, _rename(where, item, field_map, problems)))
    _raise_if(problems, source)

    fmt = _detect_format(source, renamed[0][1])
    # canonical name -> the name the field has in this format (for messages)
    field_name = {canonical: name for name, canonical in FORMATS[fmt].items()}
    field_name["category"] = "category"
    records = []
    for index, (where, item) in enumerate(renamed):
        values = {canonical: item.get(name) for canonical, name in field_name.items()}
        before = len(problems)
        for canonical, value in values.items():
            name, required = field_name[canonical], canonical in REQUIRED_FIELDS
            if value is None:
                if required:
                    problems.append(f"{where}: missing required field {name!r}")
            elif not isinstance(value, str):
                problems.append(_type_problem(where, name, value))
            elif required and not value.strip():
                problems.append(f"{where}: field {name!r} is empty")
        if len(problems) > before:
            continue
        records.append(
            Record(
                instruction=str(values["instruction"]),
                context=values["context"] or "",
                response=str(values["response"]),
                category=(values["category"] or "").strip() or UNCATEGORIZED,
                id=index,
            )
        )
    _raise_if(problems, source)
    return Dataset(records=records, source=source, sha256=digest, format=fmt)


def _rename(
    where: str, item: dict[str, Any], field_map: Mapping[str, str], problems: list[str]
) -> dict[str, Any]:
    if not field_map:
        return item
    out = {k: v for k, v in item.items() if k not in field_map}
    for old, new in field_map.items():
        if old not in item:
            continue
        if new in item and new not in field_map:
            problems.append(
                f"{where}: --map {old}={new}: the record already has a field {new!r}; "
                "map that one away too or drop this --map"
            )
        out[new] = item[old]
    return out


def _detect_format(source: str, first: Mapping[str, Any]) -> str:
    keys = set(first)
    if "response" in keys:
        return "dolly"
    if "output" in keys:
        return "alpaca"
    raise DataError(
        f"{source}: cannot tell the format; the first record has fields {sorted(keys)}. "
        "Dolly records have instruction/context/response/category, Alpaca records "
        "instruction/input/output. Rename fields with --map old=new, "
        "for example --map question=instruction --map answer=response"
    )


def _type_problem(where: str, field: str, value: Any) -> str:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"{where}: field {field!r} must be a string, got {type(value).__name__} ({shown})"


def _raise_if(problems: list[str], source: str | Path) -> None:
    if not problems:
        return
    shown = problems[:_MAX_PROBLEMS_SHOWN]
    more = len(problems) - len(shown)
    tail = f"\n  ... and {more} more" if more else ""
    raise DataError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(shown) + tail)


def _load_hub_dataset(repo_id: str, field_map: Mapping[str, str]) -> Dataset:
    """Fetch a dataset repository's data files from the Hugging Face hub (or its local cache).

    Files whose name contains "train" are preferred when there are several; they are read in
    name order and validated like local files.
    """
    try:
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(
                repo_id, repo_type="dataset", allow_patterns=[f"*{s}" for s in SUPPORTED_SUFFIXES]
            )
        )
    except Exception as e:  # the hub client raises many types (offline, DNS, 404, auth)
        raise DataError(
            f"{repo_id}: cannot fetch this dataset from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}). "
            "If the hub is unreachable from this machine, download the data elsewhere and pass "
            "the file instead: --input path/to/data.jsonl"
        ) from None
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix in SUPPORTED_SUFFIXES and not p.name.startswith("dataset_info")
    )
    files = [p for p in files if "train" in p.name] or files
    if not files:
        raise DataError(
            f"{repo_id}: the hub repository has no {'/'.join(SUPPORTED_SUFFIXES)} files"
        )
    raw: list[tuple[str, Any]] = []
    hashes = hashlib.sha256()
    for f in files:
        rel = f.relative_to(folder)
        raw += [(f"{rel}: {where}", item) for where, item in read_raw_records(f)]
        hashes.update(hashlib.sha256(f.read_bytes()).hexdigest().encode())
    return _validate(raw, repo_id, hashes.hexdigest(), field_map)


_Item = TypeVar("_Item")


def spread(items: Sequence[_Item], count: int) -> list[_Item]:
    """`count` items (at most all of them) at even steps through `items`, in order: a subset
    of a held-out file, which `covey data split` writes grouped by category, that covers
    every category rather than the first one or two."""
    count = min(count, len(items))
    return [items[i * len(items) // count] for i in range(count)]
