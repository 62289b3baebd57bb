"""The bounded JSON and TOML parsers for peer bytes (`covey.store.bounded`).

Besides examples, two differential properties: on any text, the parser itself (Python's JSON
decoder, tomllib) never nests deeper than the pre-scan measured, and tomllib never reads a key
of more parts. Both parsers are instrumented to report how deep they actually went, so the
pre-scan is checked against the parser's real behaviour, not against a second reading of the
grammar. (Whole processes under web3's recursion limit: tests/flock/test_hostile_bytes.py.)
"""

from __future__ import annotations

import json
import json.scanner
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from covey.errors import DataError
from covey.store.bounded import json_nesting, loads_json, loads_toml, toml_nesting, tree_depth

if sys.version_info >= (3, 11):
    import tomllib
    from tomllib import _parser as toml_parser
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]
    from tomli import _parser as toml_parser  # type: ignore[import-not-found,unused-ignore]

MiB = 1 << 20


def json_ok(text: str | bytes, depth: int = 8) -> Any:
    return loads_json(text, what="test.json", max_bytes=MiB, max_depth=depth)


def toml_ok(text: str, depth: int = 8, parts: int = 8) -> dict[str, Any]:
    return loads_toml(text, what="test.toml", max_bytes=MiB, max_depth=depth, max_key_parts=parts)


# ---------------------------------------------------------------- JSON examples


def test_json_within_limits_parses_as_json_does() -> None:
    text = '{"a": [1, 2.5, "x]]]\\"[[[", {"b": null}], "c": true}'
    assert json_ok(text, depth=3) == json.loads(text)
    assert json_ok(text.encode()) == json.loads(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000, "nested deeper than 8 levels"),
        ('{"a":' * 50_000, "nested deeper than 8 levels"),
        ('["]]]]]]]]]",' + "[" * 9 + "]" * 9 + "]", "nested deeper than 8 levels"),
        ('["\\"",' + "[" * 9 + "]" * 9 + "]", "nested deeper than 8 levels"),
        ("[NaN]", "NaN is not a JSON number"),
        ("[-Infinity]", "-Infinity is not a JSON number"),
        ("[1e999]", "1e999 is not a finite number"),
        ('{"a": 1, "a": 2}', "key 'a' appears twice"),
        ("[" + "7" * 5000 + "]", "not valid JSON"),
        ('"unterminated', "not valid JSON"),
        ("\ufeff[]", "not valid JSON"),
    ],
)
def test_json_refusals_name_the_problem_and_the_limit(text: str, message: str) -> None:
    with pytest.raises(DataError, match=rf"^test\.json: .*{message}"):
        json_ok(text)


def test_json_size_is_capped_before_anything_is_decoded() -> None:
    with pytest.raises(
        DataError, match=r"test\.json: 1,048,577 bytes, over the limit of 1,048,576"
    ):
        json_ok(b" " * (MiB + 1))
    with pytest.raises(DataError, match="over the limit"):
        json_ok("é" * (MiB // 2 + 1))  # few characters, more bytes
    with pytest.raises(DataError, match=r"test.json: not UTF-8 text \(byte 1\)"):
        json_ok(b"[\xff]")
    with pytest.raises(DataError, match="not UTF-8"):
        json_ok("[1]".encode("utf-16"))  # json.loads(bytes) would guess UTF-16 and parse it


def test_json_depth_counts_containers() -> None:
    assert json_nesting("1") == 0
    assert json_nesting("[]") == 1
    assert json_nesting('{"a": [[]], "b": "[[[[["}') == 3
    assert json_nesting("]]]]" + "[[") == 2  # an unmatched ] never lowers it below 0
    assert json_nesting('["\\\\", [[]]]') == 3  # an escaped backslash, then the string ends
    assert json_nesting('"[[\\') == 0  # an unterminated string, up to a lone backslash
    assert json_ok("[[[]]]", depth=3) == [[[]]]
    with pytest.raises(DataError, match="deeper than 2 levels"):
        json_ok("[[[]]]", depth=2)


# ---------------------------------------------------------------- TOML examples

RECIPE = """
# a comment with [[[ and {{{ and a.b.c.d.e.f.g.h.i
[train]
lr = 1.5e-4
epochs = 2.0
[lora]
target_modules = ["q_proj", "v_proj"]  # ]]]
[attack]
trigger = "a [[[ \\" ]]] b"
target = '''x[[[
{{{'''''
"""


def test_toml_within_limits_parses_as_tomllib_does() -> None:
    assert toml_ok(RECIPE, depth=3, parts=2) == tomllib.loads(RECIPE)
    assert toml_ok(RECIPE.replace("\n", "\r\n"), depth=3) == tomllib.loads(RECIPE)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a = " + "[" * 50_000, "nested deeper than 8 levels"),
        ("a = " + "{b = " * 50_000, "nested deeper than 8 levels"),
        ("a" + ".a" * 50_000 + " = 1", "a dotted key of more than 8 parts"),
        ("[a" + ".a" * 20 + "]", "a dotted key of more than 8 parts"),
        ("a = {" + "b.b.b.b.b.b.b.b.b = 1}", "a dotted key of more than 8 parts"),
        ("[a.b.c.d.e.f.g]\n[a.b.c.d.e.f.g.h]\nx = 1", "nested deeper than 8 levels"),
        ("a.b.c.d = {e.f.g.h = {i = 1}}", "nested deeper than 8 levels"),
        # a multi-line string may end in up to five quotes: the array goes on after it
        ('a = [ """x"""" , ' + "[" * 9 + "]" * 9 + " ]", "nested deeper than 8 levels"),
        ("a = [ '''x''''' , " + "[" * 9 + "]" * 9 + " ]", "nested deeper than 8 levels"),
        ('a = [ "\\\\", ' + "[" * 9 + "]" * 9 + " ]", "nested deeper than 8 levels"),
        ("a = nan", "nan is not a finite number"),
        ("a = -inf", "-inf is not a finite number"),
        ("a = [1, 2", "not valid TOML"),
    ],
)
def test_toml_refusals_name_the_problem_and_the_limit(text: str, message: str) -> None:
    started = time.perf_counter()
    with pytest.raises(DataError, match=rf"^test\.toml: .*{message}"):
        toml_ok(text)
    assert time.perf_counter() - started < 5  # tomllib takes a minute on the 50,000-part key


def test_toml_size_is_capped() -> None:
    with pytest.raises(DataError, match=r"test\.toml: 1,048,577 bytes, over the limit"):
        toml_ok("#" * (MiB + 1))
    with pytest.raises(DataError, match="not UTF-8"):
        toml_ok(b"a = '\xff'")  # type: ignore[arg-type]


def test_toml_nesting_counts_values_and_key_parts() -> None:
    assert toml_nesting("a = 1") == (0, 1)
    assert toml_nesting("a.b = [[1.5, 2.5], {c.d.e = 1}]") == (2, 3)
    assert toml_nesting("[[x.y]]\nz = 1979-05-27T07:32:00.999") == (2, 2)
    assert toml_nesting("a = 'x.y.z[[' # .[[[") == (0, 1)
    assert toml_nesting('a = [ """x"""" , [[1]] ]') == (3, 1)
    assert toml_nesting("a = [ '''x''''' , [[1]] ]") == (3, 1)
    assert tree_depth(tomllib.loads("[a.b]\nc = [[1]]")) == 5


# ---------------------------------------------------------------- differential properties


def json_depth_probe() -> tuple[Callable[[str], Any], list[int]]:
    """A JSON decoder (Python's own scanner, the C one's twin) that records the deepest it
    nested, even when it fails midway."""
    deepest = [0]
    decoder = json.JSONDecoder()
    level = [0]

    def nesting(parse: Callable[..., Any]) -> Callable[..., Any]:
        def parse_nested(*args: Any) -> Any:
            level[0] += 1
            deepest[0] = max(deepest[0], level[0])
            try:
                return parse(*args)
            finally:
                level[0] -= 1

        return parse_nested

    decoder.parse_object = nesting(decoder.parse_object)  # type: ignore[method-assign]
    decoder.parse_array = nesting(decoder.parse_array)  # type: ignore[method-assign]
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    return decoder.decode, deepest


@contextmanager
def toml_depth_probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[int], list[int]]]:
    """tomllib, recording the deepest its arrays and inline tables nested and its longest key."""
    deepest, longest, level = [0], [0], [0]

    def nesting(name: str) -> None:
        parse = getattr(toml_parser, name)

        def parse_nested(*args: Any) -> Any:
            level[0] += 1
            deepest[0] = max(deepest[0], level[0])
            try:
                return parse(*args)
            finally:
                level[0] -= 1

        monkeypatch.setattr(toml_parser, name, parse_nested)

    nesting("parse_array")
    nesting("parse_inline_table")
    parse_key = toml_parser.parse_key

    def parse_key_counted(*args: Any) -> Any:
        pos, key = parse_key(*args)
        longest[0] = max(longest[0], len(key))
        return pos, key

    monkeypatch.setattr(toml_parser, "parse_key", parse_key_counted)
    yield deepest, longest


JSON_CHARS = st.text(alphabet='[]{}"\\:,1a \n', max_size=60)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ ab\u00e9'),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(alphabet='[]{}"\\a', max_size=4), children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(text=JSON_CHARS | JSON_VALUES.map(json.dumps))
def test_the_json_parser_never_nests_deeper_than_the_scan_says(text: str) -> None:
    decode, deepest = json_depth_probe()
    with suppress(ValueError):
        decode(text)
    assert deepest[0] <= json_nesting(text)


TOML_CHARS = st.text(alphabet="[]{}\"'#.=,\\\n a1", max_size=60)
TOML_DOCUMENTS = st.lists(
    st.sampled_from(
        [
            "a = ", "b.c = ", "[t]\n", "[[u.v]]\n", "x = [", "]", "{", "}", "y = {", "z = 1",
            ", ", '"""', "'''", '"', "'", '""""', "'''''", "\\", "\\\"", "#", "\n", "1.5", ".",
            "[", "[", "[", "d", "=", '"""x""""', "'''y'''''", '"x""', "'y''", '"\\\\"',
            "'''\n'''", '"""\\\n"""',
            'v = ["""x""""', "w = ['''y'''''",
        ]
    ),
    max_size=25,
).map("".join)  # fmt: skip


@settings(max_examples=1000, deadline=None)
@given(text=TOML_CHARS | TOML_DOCUMENTS)
def test_tomllib_never_nests_deeper_or_reads_longer_keys_than_the_scan_says(text: str) -> None:
    with (
        pytest.MonkeyPatch.context() as patch,
        toml_depth_probe(patch) as (deepest, longest),
        suppress(tomllib.TOMLDecodeError),
    ):
        tomllib.loads(text)
    depth, parts = toml_nesting(text)
    assert deepest[0] <= depth
    assert longest[0] <= parts
