"""Every command in README.md and docs/*.md is checked or run, so the documentation cannot drift.

Commands come from the markdown itself: each line of a ```bash (sh, shell, console) block, with
`\\` continuations joined, and each inline code span that starts with a program (`covey ...`,
`make ...`). Each command is matched by its first words to one of the RULES below, which says
how the tests treat it:

- fast tier (default): every command has a rule and is well formed without running: `covey`
  commands parse against the real CLI (each option exists and takes its value; the
  `covey serve runs/...` that lacked `--run` failed here), `make` targets exist, files that
  commands name exist, other programs accept the options used (`--help`), packages are there.
- slow tier: each document's code blocks run in order, as one script, in a scratch folder that
  holds a copy of examples/: recipes get `--set` overrides that swap in the tiny test model and
  one step per client (`TINY`), input files that do not exist become fixture data, servers are
  started, checked to answer, and stopped. Commands that need other machines are `CHECK`-only
  rules that say why.

A command that matches no rule fails the fast tier with how to register it: add a `Rule` to
RULES (or, for a code span that names several commands in prose, an entry in MENTIONS).
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console", "shell-session"}
PROGRAMS = {"covey", "make", "pip", "python", "pytest", "flwr", "flower-superlink",
            "flower-supernode", "openssl"}  # fmt: skip
"""Inline code spans starting with one of these (and more than the program's name) are
commands; other spans are prose."""
BIN = Path(sys.executable).parent  # this environment's programs (flwr, flower-superlink)
MAKE_STAMP = ".venv/.covey-installed"  # `make -o` it: dry runs must not plan a fresh setup

# --- what the tests do with each command --------------------------------------------------

RUN, SERVE, CHECK = "run", "serve", "check"


@dataclass(frozen=True)
class Rule:
    how: str
    """RUN: run it and expect exit code 0; SERVE: start it, wait until it answers, stop it;
    CHECK: only the fast tier's checks (say why in `why`)."""
    why: str = ""
    recipe: bool = False
    """It takes a recipe: the slow tier appends TINY's overrides."""
    inputs: tuple[str, ...] = ()
    """Options naming input files that the slow tier creates as fixtures when missing."""
    marks: tuple[str, ...] = ()
    """Test tiers the run needs besides `slow` (the whole document's run gets them)."""


RULES: dict[tuple[str, ...], Rule] = {
    ("covey", "data", "split"): Rule(RUN, inputs=("--input", "-i", "--test-from")),
    ("covey", "train"): Rule(RUN, recipe=True, marks=("chain",)),  # FLock mode: embedded EVM
    ("covey", "generate"): Rule(RUN),
    ("covey", "eval"): Rule(RUN),
    ("covey", "export"): Rule(RUN),
    ("covey", "serve"): Rule(SERVE),
    ("covey", "flower", "simulate"): Rule(RUN, recipe=True, marks=("flower",)),
    ("covey", "flower", "local"): Rule(RUN, recipe=True, marks=("flower",)),
    ("covey", "flower", "certs"): Rule(RUN),
    ("covey", "flower", "node-key"): Rule(RUN),
    # Started from the docs in CI, Flower's SuperLink came up on its HTTP APIs but the check
    # saw no answer within 300 s; tests/flower starts SuperLinks on loopback and uses them
    ("covey", "flower", "superlink"): Rule(
        CHECK, "a long-running server; tests/flower starts SuperLinks and runs federations"
    ),
    ("flower-superlink",): Rule(
        CHECK, "Flower's own server; tests/flower starts SuperLinks and runs federations"
    ),
    ("openssl",): Rule(RUN),
    ("covey", "flower", "register"): Rule(
        CHECK, "needs a SuperLink at the address given; tests/flower registers on loopback"
    ),
    ("covey", "flower", "supernode"): Rule(
        CHECK, "needs a remote SuperLink; tests/flower runs SuperNodes on loopback"
    ),
    ("flower-supernode",): Rule(CHECK, "needs a remote SuperLink; see covey flower supernode"),
    ("covey", "flower", "run"): Rule(
        CHECK, "needs a running federation; tests/flower submits runs on loopback"
    ),
    ("flwr",): Rule(CHECK, "Flower's own CLI against a running federation"),
    ("covey", "flock", "devnet"): Rule(
        CHECK, "runs a network for minutes; tests/flock/test_network.py runs its code (Devnet)"
    ),
    ("covey", "flock", "create"): Rule(
        CHECK, "needs a chain node; tests/flock/test_network.py creates a task on anvil"
    ),
    ("covey", "flock", "join"): Rule(
        CHECK, "needs a task on a chain node; tests/flock/test_network.py joins on anvil"
    ),
    ("covey", "flock", "status"): Rule(
        CHECK, "needs a task on a chain node; tests/flock/test_network.py runs it on anvil"
    ),
    ("covey", "flock", "fetch"): Rule(
        CHECK, "needs a finished task; tests/flock/test_network.py fetches from anvil"
    ),
    ("make", "demo"): Rule(RUN),  # its recipe lines run, on TINY
    ("make",): Rule(CHECK, "the CI entry points (make test runs these tests)"),
    ("pytest",): Rule(CHECK, "the test suite itself"),
    ("python",): Rule(CHECK, "benchmarks take minutes to hours; benchmarks/README.md"),
    ("pip", "install"): Rule(CHECK, "installs from a package index"),
}

MENTIONS = {
    "covey flower local / simulate / run ...": "names three commands in a table",
    "covey flock create / join / status / fetch / devnet": "names five commands in a table",
}
"""Inline code spans that look like commands but are prose, with why."""


def tiny_overrides(model_dir: Path) -> list[str]:
    """`--set` overrides that make any shipped recipe run in seconds on the tiny test model."""
    sets = [f"model.base='{model_dir}'", "lora.r=4", "lora.alpha=8", "prompt.cutoff_len=96",
            "train.max_steps=1", "train.batch_size=4", "train.micro_batch_size=4",
            "eval.max_examples=4", "eval.batch_size=4", "eval.sample_instructions=1",
            "eval.max_new_tokens=4", "flock.validation_examples=4"]  # fmt: skip
    return [arg for s in sets for arg in ("--set", s)]


# --- reading the commands out of the markdown ---------------------------------------------


@dataclass(frozen=True)
class DocCommand:
    where: str
    """`README.md:42`"""
    text: str
    """As written, continuation lines joined."""
    argv: tuple[str, ...] = ()
    """Without leading VAR=value assignments; `.venv/bin/` dropped from the program."""
    env: tuple[tuple[str, str], ...] = ()
    inline: bool = False

    @property
    def rule(self) -> Rule | None:
        for length in range(len(self.argv), 0, -1):
            if self.argv[:length] in RULES:
                return RULES[self.argv[:length]]
        return None

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def parse_command(where: str, text: str, inline: bool = False) -> DocCommand | None:
    try:
        words = shlex.split(text, comments=True)
    except ValueError as e:
        raise AssertionError(f"{where}: cannot split `{text}` as a shell command ({e})") from None
    env = []
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env.append((name, value))
    if not words:
        return None
    words[0] = words[0].removeprefix(".venv/bin/").removeprefix("$(BIN)/")
    return DocCommand(where, text.strip(), tuple(words), tuple(env), inline)


def read_document(path: Path) -> tuple[list[list[DocCommand]], list[DocCommand]]:
    """(code blocks, each a list of commands; inline commands) of one markdown file."""
    name = path.relative_to(REPO).as_posix()
    blocks: list[list[DocCommand]] = []
    inline: list[DocCommand] = []
    fence: str | None = None
    language = ""
    pending, start = "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            match = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if match:
                fence, language = match.group(1), match.group(2).lower()
                if language in SHELL_BLOCKS:
                    blocks.append([])
                continue
            for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", line):
                words = span.split()
                program = words[0].removeprefix(".venv/bin/") if words else ""
                if program in PROGRAMS and len(words) > 1 and span not in MENTIONS:
                    command = parse_command(f"{name}:{number}", span, inline=True)
                    if command is not None:
                        inline.append(command)
            continue
        if stripped.startswith(fence) and stripped.strip(fence[0]) == "":
            fence = None
            continue
        if language not in SHELL_BLOCKS:
            continue
        if language in ("console", "shell-session"):
            if not stripped.startswith("$ ") and not pending:
                continue  # output, not a command
            line = line.replace("$ ", "", 1) if not pending else line
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = parse_command(f"{name}:{start}", pending + line)
        pending = ""
        if command is not None:
            blocks[-1].append(command)
    return blocks, inline


def all_commands() -> list[DocCommand]:
    found = []
    for path in DOCUMENTS:
        blocks, inline = read_document(path)
        found += [c for block in blocks for c in block] + inline
    return found


def make_recipe(target: str, variables: tuple[str, ...] = ()) -> list[str]:
    """The commands `make TARGET` runs, from a dry run (setup taken as done)."""
    result = subprocess.run(
        ["make", "-s", "-n", "-o", MAKE_STAMP, target, *variables],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"make {target}: {result.stderr.strip()}"
    return [line for line in result.stdout.splitlines() if line.strip()]


# --- the fast tier: every command has a rule and is well formed ----------------------------


def test_the_documents_hold_commands() -> None:
    blocks, inline = read_document(REPO / "README.md")
    assert sum(map(len, blocks)) >= 5 and inline  # the reader found them


def test_every_documented_command_has_a_rule() -> None:
    missing = [str(c) for c in all_commands() if c.rule is None]
    assert not missing, (
        "documented commands that no test checks or runs:\n  "
        + "\n  ".join(missing)
        + "\nRegister each in tests/test_docs.py: a Rule in RULES keyed by its first words "
        "(RUN, SERVE or CHECK with the reason it cannot run in a test), or, for an inline "
        "span that is prose rather than one command, an entry in MENTIONS."
    )


FLOWER_PROGRAMS = ("flwr", "flower-superlink", "flower-supernode")


def _well_formed_params() -> list[object]:
    """Every command; those whose check starts Flower's own programs are in the flower tier."""
    return [
        pytest.param(
            c, id=str(c), marks=[pytest.mark.flower] if c.argv[0] in FLOWER_PROGRAMS else []
        )
        for c in all_commands()
    ]


@pytest.mark.parametrize("command", _well_formed_params())
def test_documented_command_is_well_formed(command: DocCommand) -> None:
    if command.rule is None:
        pytest.fail(f"{command}: no rule (see test_every_documented_command_has_a_rule)")
    program = command.argv[0]
    for word in command.argv[1:]:  # files of this repository that a command names
        if word.startswith(("examples/", "benchmarks/", "scripts/", "docs/")):
            assert (REPO / word).exists(), f"{command}: {word} does not exist"
    if program == "covey":
        check_covey_arguments(command)
    elif program == "make":
        targets = [w for w in command.argv[1:] if "=" not in w and not w.startswith("-")]
        variables = tuple(w for w in command.argv[1:] if "=" in w)
        for target in targets or ["setup"]:
            make_recipe(target, variables)
    elif program == "pip":
        check_pip_install(command)
    elif program == "python":
        script = command.argv[1] if len(command.argv) > 1 else ""
        if script and not script.startswith("-"):
            assert (REPO / script).is_file(), f"{command}: no file {script}"
    elif program in FLOWER_PROGRAMS:
        check_options_in_help(command)


def check_covey_arguments(command: DocCommand) -> None:
    """Parse the arguments with the real `covey` CLI, as running it would (nothing runs)."""
    import click
    import typer

    from covey.cli import app

    group: click.Command = typer.main.get_command(app)
    try:
        context = group.make_context("covey", list(command.argv[1:]))
        while isinstance(group, click.Group):
            protected = (
                context._protected_args  # click >= 8.2
                if hasattr(context, "_protected_args")
                else context.protected_args
            )
            rest = [*protected, *context.args]
            name, sub, rest = group.resolve_command(context, rest)
            assert sub is not None and name is not None
            group, context = sub, sub.make_context(name, rest, parent=context)
    except click.exceptions.Exit:
        pass  # --help
    except click.ClickException as e:
        if command.inline and isinstance(e, click.MissingParameter | click.BadOptionUsage):
            return  # prose names a command or an option, without all of its arguments
        pytest.fail(f"{command}: {e.format_message()}")


def check_pip_install(command: DocCommand) -> None:
    """Covey's extras exist in pyproject.toml; other packages are installed here (setup did)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for requirement in (w for w in command.argv[2:] if not w.startswith("-")):
        match = re.match(r"^([A-Za-z0-9._-]+)(?:\[([\w,-]+)\])?", requirement)
        assert match, f"{command}: cannot read requirement {requirement!r}"
        name, wanted = match.group(1), match.group(2)
        if name == "covey":
            unknown = set((wanted or "").split(",")) - set(extras) - {""}
            assert not unknown, f"{command}: pyproject.toml has no extra {sorted(unknown)}"
        else:
            metadata.distribution(name)  # raises PackageNotFoundError


def check_options_in_help(command: DocCommand) -> None:
    """Another program's options as documented appear in its --help."""
    words = list(command.argv)
    subcommands = [w for w in words[1:3] if re.fullmatch(r"[a-z-]+", w) and not w.startswith("-")]
    if words[0] == "flwr" and not subcommands:
        pytest.fail(f"{command}: which flwr subcommand?")
    program = [words[0], *subcommands[: 2 if words[0] == "flwr" else 0]]
    help_text = _help(tuple(program))
    assert help_text is not None, f"{command}: `{' '.join(program)} --help` failed"
    for option in (w.split("=")[0] for w in words if w.startswith("--")):
        assert option in help_text, f"{command}: {' '.join(program)} has no {option}"


@functools.cache
def _help(program: tuple[str, ...]) -> str | None:
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        [*program, "--help"], capture_output=True, text=True, timeout=120, env=env
    )
    return result.stdout if result.returncode == 0 else None


# --- the slow tier: each document's blocks, run in order -----------------------------------


def document_marks(path: Path) -> list[pytest.MarkDecorator]:
    blocks, _ = read_document(path)
    names = {m for block in blocks for c in block if c.rule for m in c.rule.marks}
    return [pytest.mark.slow, *(getattr(pytest.mark, name) for name in sorted(names))]


RUNNABLE = [
    pytest.param(path, marks=document_marks(path), id=path.relative_to(REPO).as_posix())
    for path in DOCUMENTS
    if any(read_document(path)[0])
]


@dataclass
class Sandbox:
    """A scratch folder standing in for a clone of the repository, with the tiny model."""

    root: Path
    model_dir: Path
    log: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return os.environ | {
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1",
            "COVEY_SERVE_AUTH": "",
        }

    def argv(self, command: DocCommand) -> list[str]:
        words = list(command.argv)
        rule = command.rule
        assert rule is not None
        if words[0] == "covey":
            words = [sys.executable, "-m", "covey", *words[1:]]
        if rule.recipe:
            words += tiny_overrides(self.model_dir)
        for i, word in enumerate(words[:-1]):
            if word in rule.inputs:
                self.fixture_file(words[i + 1])
        return words

    def fixture_file(self, name: str) -> None:
        from tests.conftest import dolly_records, write_records

        path = self.root / name
        if not path.exists() and path.suffix in (".jsonl", ".json", ".csv", ".parquet"):
            write_records(path, dolly_records(per_category=100))

    def run(self, command: DocCommand) -> None:
        rule = command.rule
        assert rule is not None, f"{command}: no rule"
        if rule.how == CHECK:
            return
        if command.argv[:2] == ("make", "demo"):
            for line in make_recipe("demo"):
                expanded = parse_command(command.where, line)
                assert expanded is not None
                self.run(expanded)
            return
        env = self.env | dict(command.env)
        if rule.how == SERVE:
            self.serve(command, env)
            return
        if command.argv[0] == "covey":
            argv: list[str] | str = self.argv(command)
        else:
            argv = ["bash", "-c", command.text]  # process substitution and the like
        started = time.monotonic()
        result = subprocess.run(
            argv, cwd=self.root, env=env, capture_output=True, text=True, timeout=900
        )
        status = "ok" if result.returncode == 0 else f"exit {result.returncode}"
        self.log.append(f"{time.monotonic() - started:6.1f} s  {status}  {command}")
        assert result.returncode == 0, (
            f"{command}\nfailed with exit code {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )

    def serve(self, command: DocCommand, env: dict[str, str]) -> None:
        """Start a server as documented (on a free loopback port), wait until it answers."""
        words = self.argv(command) if command.argv[0] == "covey" else list(command.argv)
        port = _free_port()
        for i, word in enumerate(words[:-1]):
            if word == "--port":
                words[i + 1] = str(port)
            if word == "--host":
                words[i + 1] = "127.0.0.1"
        if "--port" not in words and command.argv[:2] == ("covey", "serve"):
            words += ["--port", str(port)]
        log_path = self.root / f"serve-{port}.log"
        started = time.monotonic()
        with open(log_path, "wb") as log_file:
            server = subprocess.Popen(
                words, cwd=self.root, env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            _wait_until_answering(port, server, log_path, http=command.argv[0] == "covey")
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        self.log.append(f"{time.monotonic() - started:6.1f} s  answered  {command}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_answering(
    port: int, server: subprocess.Popen[bytes], log: Path, http: bool, timeout: float = 300
) -> None:
    probe: Callable[[], object]
    if http:
        probe = lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)  # noqa: E731
    else:
        probe = lambda: socket.create_connection(("127.0.0.1", port), timeout=5).close()  # noqa: E731
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"exited with {server.returncode} before answering:\n{log.read_text()}")
        try:
            probe()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"no answer on port {port} within {timeout:.0f} s:\n{log.read_text()}")


@pytest.mark.timeout(1200)  # a document's whole script, a minute or more of it in model loading
@pytest.mark.parametrize("document", RUNNABLE)
def test_documented_commands_run(
    document: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The document's code blocks, in order, as a newcomer would type them (on TINY)."""
    import shutil

    sandbox = Sandbox(tmp_path / "repo", tiny_model_dir)
    shutil.copytree(REPO / "examples", sandbox.root / "examples")
    blocks, _ = read_document(document)
    failures = []
    for command in (c for block in blocks for c in block):
        try:
            sandbox.run(command)
        except (AssertionError, pytest.fail.Exception, subprocess.TimeoutExpired) as e:
            failures.append(str(e))  # go on: one report lists every command that fails
    with capsys.disabled():
        print(f"\n{document.name}:\n" + "\n".join(sandbox.log))
    assert not failures, "\n\n".join(failures)
