"""The `covey` command line. Thin: parse flags into a config, call one function, print."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
import typer.rich_utils
from rich.console import Console
from rich.table import Table
from rich.text import Text

from covey.console import PLAIN_WIDTH, console, quiet_libraries
from covey.data.partition import Scheme
from covey.data.records import parse_field_map
from covey.data.split import BUNDLED_SAMPLE, SplitConfig, run_split
from covey.errors import CoveyError

if TYPE_CHECKING:  # torch loads only when a command needs it
    from covey.fed.runfolder import RoundRecord

app = typer.Typer(
    help="Covey: federated fine-tuning of LoRA adapters for causal language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Prepare instruction data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

_defaults = SplitConfig()


@data_app.command("split")
def data_split(
    input: str = typer.Option(
        BUNDLED_SAMPLE,
        "--input",
        "-i",
        help="JSON list, JSONL, CSV or Parquet file, or a Hugging Face dataset id. "
        "Default: the 400-record Dolly sample shipped with Covey.",
    ),
    out: Path = typer.Option(_defaults.out, "--out", "-o", help="Output folder."),
    clients: int = typer.Option(_defaults.clients, "--clients", "-n", help="Number of clients."),
    scheme: Scheme = typer.Option(_defaults.scheme, help="How rows are divided among clients."),
    seed: int = typer.Option(_defaults.seed, help="Seed of every random choice."),
    alpha: float = typer.Option(_defaults.alpha, help="Dirichlet concentration (dirichlet)."),
    min_size: int = typer.Option(_defaults.min_size, help="Minimum training records per client."),
    test_per_category: int = typer.Option(
        10, help="Held-out test records per category (Shepherd: 10)."
    ),
    test_fraction: float | None = typer.Option(
        None, help="Hold out this fraction of each category instead."
    ),
    test_from: str | None = typer.Option(
        None, help="Use this file as the test set; hold out nothing from --input."
    ),
    categories_per_client: int = typer.Option(
        _defaults.categories_per_client, help="Categories per client (categories)."
    ),
    quantity_skew: float | None = typer.Option(
        None, help="Dirichlet(beta) client sizes (iid, categories); smaller is more unequal."
    ),
    field_map: list[str] = typer.Option(
        [], "--map", help="Rename a field before format detection: old=new (repeatable)."
    ),
    dedup: bool = typer.Option(False, help="Drop repeated records, keeping the first."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output folder."),
) -> None:
    """Split instruction data into per-client training files and a global test set."""
    cfg = SplitConfig(
        input=input,
        out=out,
        clients=clients,
        scheme=scheme,
        seed=seed,
        alpha=alpha,
        min_size=min_size,
        test_per_category=test_per_category,
        test_fraction=test_fraction,
        test_from=test_from,
        categories_per_client=categories_per_client,
        quantity_skew=quantity_skew,
        field_map=parse_field_map(field_map),
        dedup=dedup,
        overwrite=overwrite,
    )
    manifest = run_split(cfg)
    console.print(allocation_table(manifest))
    dups = manifest["duplicates"]
    if dups["count"]:
        action = "dropped" if dups["dropped"] else "kept (pass --dedup to drop them)"
        console.print(f"[yellow]{dups['count']} duplicate record(s) {action}[/yellow]")
    console.print(
        f"{manifest['train_records']} training records for {len(manifest['clients'])} clients, "
        f"{manifest['test']['count']} held out for testing; wrote {out}/"
    )


def allocation_table(manifest: dict[str, Any]) -> Table:
    """Clients by categories, with totals: the printed summary of a split."""
    categories = manifest["categories"]
    table = Table(title=f"{manifest['scheme']} split (seed {manifest['seed']})")
    table.add_column("client", justify="right")
    for c in categories:
        table.add_column(c.replace("_", " "), justify="right")
    table.add_column("total", justify="right", style="bold")
    for client in manifest["clients"]:
        counts = [client["by_category"].get(c, 0) for c in categories]
        table.add_row(str(client["client"]), *map(str, counts), str(client["count"]))
    test = manifest["test"]
    table.add_section()
    table.add_row(
        "test", *(str(test["by_category"].get(c, 0)) for c in categories), str(test["count"])
    )
    return table


@app.command("train")
def train(
    recipe: Path | None = typer.Argument(
        None, help="TOML recipe (see examples/); omitted: the built-in defaults."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override one setting: section.key=value (repeatable)."
    ),
    attack: str | None = typer.Option(
        None, help="Malicious participants' attack (sets attack.kind): sign_flip, noise, ..."
    ),
    malicious_fraction: float | None = typer.Option(
        None, help="Share of malicious participants (sets attack.malicious_fraction)."
    ),
    consensus: str | None = typer.Option(
        None, help="server (FedIT: a server aggregates) or flock (stake, vote, contract)."
    ),
    resume: bool = typer.Option(False, help="Continue run.out from its last complete round."),
    overwrite: bool = typer.Option(False, help="Delete an existing run.out first."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Federated LoRA fine-tuning in one process (the embedded engine)."""
    from covey.config import load_recipe
    from covey.fed import engine
    from covey.fed.report import answers_table, rounds_table
    from covey.fed.rounds import RunFolder
    from covey.model.loading import base_model_id, load_base_model

    quiet_libraries()
    if resume and overwrite:
        raise CoveyError("--resume and --overwrite exclude each other; choose one")
    if attack is not None:
        overrides = [*overrides, f"attack.kind={attack}"]
    if malicious_fraction is not None:
        overrides = [*overrides, f"attack.malicious_fraction={malicious_fraction}"]
    if consensus is not None:
        overrides = [*overrides, f"fed.consensus={consensus}"]
    # everything that can be checked without the model is checked before anything is deleted
    cfg = load_recipe(recipe, overrides)
    engine.preflight(cfg)
    out = Path(cfg.run.out)
    if overwrite:
        engine.remove_run(out)
    folder = RunFolder.check(cfg, resume)
    with console.status(f"loading {cfg.model.base}"):
        model, tokenizer = load_base_model(cfg.model)
        fed = engine.prepare(cfg, model, tokenizer, base_model_id(cfg.model))
    flock = cfg.fed.consensus == "flock"
    rounds = (
        f"FLock rounds ({cfg.flock.proposers_per_round} proposers, "
        f"{cfg.flock.voters_per_round} voters)"
        if flock
        else f"rounds of {cfg.fed.strategy}"
    )
    console.print(
        f"{len(fed.clients)} clients ({sum(len(c.examples) for c in fed.clients)} examples), "
        f"{len(fed.run_model.held_out.examples)} held-out examples, {cfg.fed.rounds} {rounds} "
        f"-> {out}/"
    )
    with _progress(quiet) as progress:
        if flock:
            from covey.flock.protocol import run_flock

            result = run_flock(cfg, fed, hooks=_hooks(progress), folder=folder)
        else:
            result = engine.run_federated(cfg, fed, hooks=_hooks(progress), folder=folder)
    if flock:
        from covey.flock.report import balances_table, flock_round_table

        for record in result.rounds[1:]:
            console.print(flock_round_table(record))
        console.print(balances_table(out / "flock.json"))
    console.print(rounds_table(result.rounds))
    if result.rounds[-1].answers:
        console.print(answers_table(result.rounds[0], result.rounds[-1], cfg.eval.max_new_tokens))
    console.print(f"final adapter: {out / 'final'}/  (metrics.jsonl, loss.png in {out}/)")


# Serving (covey.serve.commands imports no heavy library until a command runs)
from covey.serve import commands as serve_commands  # noqa: E402

app.command("serve")(serve_commands.serve)
app.command("generate")(serve_commands.generate)
app.command("export")(serve_commands.export)

# Quality side by side (covey.eval.command loads torch only when the command runs)
from covey.eval.command import evaluate  # noqa: E402

app.command("eval")(evaluate)

# Flower (covey.flower.cli imports Flower only when a command needs it)
from covey.flower.cli import flower_app  # noqa: E402

app.add_typer(flower_app, name="flower")

# FLock as a network (covey.flock.cli loads the chain libraries only when a command runs)
from covey.flock.cli import flock_app  # noqa: E402

app.add_typer(flock_app, name="flock")


def _progress(quiet: bool) -> Any:
    from contextlib import nullcontext

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if quiet:
        return nullcontext(None)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    )


def _hooks(progress: Any) -> Any:
    """Progress bars for rounds, clients and steps (with tokens/s)."""
    import time

    from covey.fed.rounds import Hooks

    if progress is None:
        return Hooks(round_end=lambda r: console.print(_round_line(r)))
    rounds = progress.add_task("rounds", total=None, info="")
    clients = progress.add_task("clients", total=None, info="")
    steps = progress.add_task("steps", total=None, info="")
    clock = {"t": time.perf_counter(), "tokens": 0}

    def round_start(index: int, total: int, selected: list[int]) -> None:
        progress.update(rounds, total=total, completed=index - 1, info=f"round {index}")
        progress.update(clients, total=len(selected), completed=0, info="")

    def client_start(client: int, n_examples: int) -> None:
        progress.update(clients, info=f"client {client} ({n_examples} examples)")
        progress.update(steps, completed=0, total=None, info="")
        clock.update(t=time.perf_counter(), tokens=0)

    def step(done: int, total: int, tokens: int) -> None:
        clock["tokens"] += tokens
        rate = clock["tokens"] / max(time.perf_counter() - clock["t"], 1e-9)
        progress.update(steps, completed=done, total=total, info=f"{rate:,.0f} tokens/s")
        if done == total:
            progress.advance(clients)

    def round_end(record: RoundRecord) -> None:
        progress.update(rounds, completed=record.round)
        progress.console.print(_round_line(record))

    return Hooks(round_start=round_start, client_start=client_start, step=step, round_end=round_end)


def _round_line(record: RoundRecord) -> str:
    rejected = f", {len(record.rejected)} rejected" if record.rejected else ""
    evaluated = record.eval
    rouge = f", ROUGE-L {evaluated['rouge_l']:.3f}" if "rouge_l" in evaluated else ""
    return (
        f"round {record.round}: held-out loss {evaluated['loss']:.4f} "
        f"(ppl {evaluated['perplexity']:.2f}){rouge}, {len(record.clients)} clients{rejected}"
    )


def main() -> None:
    """Entry point: user errors print one clear message and exit with code 2, no traceback."""
    if not sys.stdout.isatty():
        # --help off a terminal at the width of `covey.console` (Typer's default would cut the
        # option names); set here, not at import, so importing covey.cli changes no library
        typer.rich_utils.MAX_WIDTH = PLAIN_WIDTH
    try:
        app()
    except CoveyError as e:
        # Text, not markup: messages contain brackets such as "record [3]"
        # soft_wrap: off a terminal the message stays on one line (logs and tests grep it)
        Console(stderr=True).print(
            Text.assemble(("error: ", "bold red"), str(e)), highlight=False, soft_wrap=True
        )
        raise SystemExit(2) from None
