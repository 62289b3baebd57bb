"""The `covey` command line. Thin: parse flags into a config, call one function, print."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from covey.data.partition import Scheme
from covey.data.records import parse_field_map
from covey.data.split import BUNDLED_SAMPLE, SplitConfig, run_split
from covey.errors import CoveyError

app = typer.Typer(
    help="Covey: federated fine-tuning of LoRA adapters for causal language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Prepare instruction data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
# Outside a terminal (CI logs, pipes) rich assumes 80 columns, too narrow for the tables.
console = Console(width=None if sys.stdout.isatty() else 160)

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


def main() -> None:
    """Entry point: user errors print one clear message and exit with code 2, no traceback."""
    try:
        app()
    except CoveyError as e:
        # Text, not markup: messages contain brackets such as "record [3]"
        Console(stderr=True).print(Text.assemble(("error: ", "bold red"), str(e)), highlight=False)
        raise SystemExit(2) from None
