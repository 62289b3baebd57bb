"""Bounded parsers for bytes from peers: JSON and TOML under a size cap and a nesting cap.

Python's JSON parser (C) and tomllib recurse once per nested `[` or `{`. Their only guard is
`sys.getrecursionlimit()`, which web3's `py_ecc` raises to 100,000 on import (so in every FLock
participant): 100 kB of `[` then overflows the C stack and the process dies with SIGSEGV, not
an exception. So the nesting depth is measured first, by a scan without recursion that skips
strings (and their escapes) and comments the way the parser does, and text nested deeper than
the caller's cap is refused before any parser sees it, whatever the recursion limit.

TOML gets two more checks. A dotted key costs tomllib time quadratic in its parts (50,000 parts
take a minute), so a key's parts are capped in the same scan. Dotted keys and `[a.b.c]`
headers nest tables without brackets, so the parsed tree's depth is checked too (iteratively).

JSON refuses what a peer has no business sending and what another parser could read
differently: NaN and infinities, and a key given twice in one object.

Every refusal is a `covey.errors.DataError` that names what was parsed and the limit.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

import numpy as np

from covey.errors import DataError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

# A JSON string, escapes and all, up to its closing quote or, if it never closes, the end of
# the text (the parser refuses that anyway). Unrolled (`[^"\\]*(?:\\.[^"\\]*)*`) and always
# matching once started, so removing every string costs one linear pass in the regex engine.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_JSON_STEPS = np.zeros(256, dtype=np.int64)
_JSON_STEPS[[ord("["), ord("{")]] = 1
_JSON_STEPS[[ord("]"), ord("}")]] = -1
# The characters that matter to the TOML scan; the regex engine skips everything between them.
_TOML_CODE = re.compile(r"""[\[\]{}"'#.=,\n]""")
_TOML_BASIC = re.compile(r'["\\\n]')
_TOML_MULTILINE_BASIC = re.compile(r'["\\]')
_TOML_LITERAL = re.compile(r"['\n]")
_OPENERS = "[{"
_CLOSERS = "]}"
# a dotted key's run of parts ends at any of these (a float or a time has one dot per value)
_KEY_RUN_ENDS = "=,[]{}\n"


def _too_deep(what: str, max_depth: int) -> DataError:
    return DataError(f"{what}: nested deeper than {max_depth} levels (the limit); refused")


def _too_large(what: str, size: int, max_bytes: int) -> DataError:
    return DataError(f"{what}: {size:,} bytes, over the limit of {max_bytes:,}; refused")


def _as_text(data: bytes | str, what: str, max_bytes: int) -> str:
    """`data` as text, after checking its UTF-8 size against `max_bytes` (bytes first: a str
    of n characters is at least n bytes, so a huge one is refused before it is encoded)."""
    if isinstance(data, str):
        if len(data) > max_bytes:
            raise _too_large(what, len(data), max_bytes)
        size = len(data.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise _too_large(what, size, max_bytes)
        return data
    if len(data) > max_bytes:
        raise _too_large(what, len(data), max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what}: not UTF-8 text (byte {e.start})") from None


# ---------------------------------------------------------------- JSON


def json_nesting(text: str) -> int:
    """How deep `text` nests arrays and objects, counted as the parser will see them: brackets
    inside strings do not count, and `\\"` does not end a string.

    Vectorized, so that a megabyte of `[][][]...` costs milliseconds: strings are removed,
    each remaining bracket is a step of +1 or -1 (UTF-8 bytes of other characters are never
    brackets), and the depth is their running sum held at 0 from below (an unmatched `]`
    never lowers it below 0): sum minus its lowest value so far. Invalid JSON can only be
    over-counted that way, and the parser refuses it anyway.
    """
    code = _JSON_STRING.sub("", text).encode("utf-8", "surrogatepass")
    if not code:
        return 0
    depth = np.cumsum(_JSON_STEPS[np.frombuffer(code, dtype=np.uint8)])
    floor = np.minimum.accumulate(np.minimum(depth, 0))
    return int((depth - floor).max())


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is not a finite number")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in pairs:
        if key in tree:
            raise ValueError(f"key {key[:80]!r} appears twice in one object")
        tree[key] = value
    return tree


def loads_json(data: bytes | str, *, what: str, max_bytes: int, max_depth: int) -> Any:
    """Parse JSON from a peer: at most `max_bytes` of UTF-8, nested at most `max_depth` deep
    (`[]` is depth 1), no NaN or infinity, no key twice in an object. DataError otherwise."""
    text = _as_text(data, what, max_bytes)
    if json_nesting(text) > max_depth:
        raise _too_deep(what, max_depth)
    try:
        return json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        # RecursionError cannot come from within the depth cap; kept so it never could escape
        raise DataError(f"{what}: not valid JSON ({e})") from None


# ---------------------------------------------------------------- TOML


def toml_nesting(text: str, stop_above: int | None = None) -> tuple[int, int]:
    """(how deep TOML `text` nests arrays and inline tables, the most parts of a dotted key),
    counted as tomllib reads the text: strings of all four kinds (with escapes in basic ones,
    and the up-to-two extra quotes that may close a multi-line string) and comments do not
    count. The scan stops as soon as either passes `stop_above`.

    Table headers count their brackets (`[[a]]` is depth 2), which only over-counts; so does
    anything in text tomllib refuses. `text` must have its line ends normalized (`\\r\\n` to
    `\\n`), as tomllib does.
    """
    depth = deepest = 0
    dots = most_dots = 0
    pos = 0
    while stop_above is None or max(deepest, most_dots + 1) <= stop_above:
        match = _TOML_CODE.search(text, pos)
        if match is None:
            break
        char = match.group()
        pos = match.end()
        if char == '"':
            pos = _skip_toml_string(text, pos - 1, '"')
        elif char == "'":
            pos = _skip_toml_string(text, pos - 1, "'")
        elif char == "#":
            end = text.find("\n", pos)
            pos = len(text) if end < 0 else end  # the newline itself ends a key run
        elif char == ".":
            dots += 1
            most_dots = max(most_dots, dots)
        else:
            dots = 0 if char in _KEY_RUN_ENDS else dots
            if char in _OPENERS:
                depth += 1
                deepest = max(deepest, depth)
            elif char in _CLOSERS:
                depth = max(0, depth - 1)
    return deepest, most_dots + 1


def _skip_toml_string(text: str, start: int, quote: str) -> int:
    """The position after the string that opens at `start` with `quote`, as tomllib ends it.

    A string tomllib refuses (a newline in a one-line string, no closing quotes) ends where
    tomllib stops reading: the rest is scanned as code, which can only over-count.
    """
    multiline = text.startswith(quote * 3, start)
    pos = start + (3 if multiline else 1)
    if quote == "'":
        if multiline:
            end = text.find("'''", pos)
            return len(text) if end < 0 else _extra_quotes(text, end + 3, "'")
        end_match = _TOML_LITERAL.search(text, pos)
        if end_match is None:
            return len(text)
        return end_match.end() if end_match.group() == "'" else end_match.start()
    pattern = _TOML_MULTILINE_BASIC if multiline else _TOML_BASIC
    while True:
        match = pattern.search(text, pos)
        if match is None:
            return len(text)
        char = match.group()
        if char == "\\":
            pos = match.end() + 1  # an escape is two characters (`\\u` and the rest are hex)
        elif char == "\n":
            return match.start()
        elif not multiline:
            return match.end()
        elif text.startswith('"""', match.start()):
            return _extra_quotes(text, match.start() + 3, '"')
        else:
            pos = match.end()


def _extra_quotes(text: str, pos: int, quote: str) -> int:
    """tomllib lets a multi-line string's closing `'''`/`\"\"\"` be followed by up to two more
    quotes, which belong to the string."""
    for _ in range(2):
        if text.startswith(quote, pos):
            pos += 1
    return pos


def tree_depth(tree: Any) -> int:
    """Nesting depth of dicts and lists in a parsed tree (a scalar: 0, `{}` or `[]`: 1),
    computed without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        children: Any
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def loads_toml(
    data: bytes | str, *, what: str, max_bytes: int, max_depth: int, max_key_parts: int = 8
) -> dict[str, Any]:
    """Parse TOML from a peer: at most `max_bytes` of UTF-8, arrays and inline tables nested
    at most `max_depth` deep and a parsed tree (tables included, the document itself is 1)
    at most `max_depth` deep, dotted keys of at most `max_key_parts` parts, no nan or inf.
    DataError otherwise."""
    text = _as_text(data, what, max_bytes).replace("\r\n", "\n")
    depth, key_parts = toml_nesting(text, stop_above=max(max_depth, max_key_parts))
    if depth > max_depth:
        raise _too_deep(what, max_depth)
    if key_parts > max_key_parts:
        raise DataError(
            f"{what}: a dotted key of more than {max_key_parts} parts (the limit); refused"
        )
    try:
        tree: dict[str, Any] = tomllib.loads(text, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:  # TOMLDecodeError is a ValueError
        raise DataError(f"{what}: not valid TOML ({e})") from None
    if tree_depth(tree) > max_depth:
        raise _too_deep(what, max_depth)
    return tree
