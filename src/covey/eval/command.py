"""`covey eval`: flags in, one `run_eval` call, tables out (registered in `covey.cli`).

Heavy imports (torch, transformers) happen inside the command, so `covey --help` stays fast;
every check that needs no model (folders, rounds, base ids, test file, flags) runs first.
"""

from __future__ import annotations

from pathlib import Path

import typer

from covey.errors import ConfigError
from covey.model.generate import PRESETS


def evaluate(
    run: Path | None = typer.Option(
        None, "--run", help="Run folder of `covey train`: its final adapter, unless --round."
    ),
    rounds: list[int] = typer.Option(
        [], "--round", help="Evaluate round_<K>/ of --run (repeatable; 0 = before training)."
    ),
    adapters: list[Path] = typer.Option(
        [],
        "--adapter",
        help="A PEFT adapter folder (a round, final/, or `covey flock fetch` output); repeatable.",
    ),
    base: str | None = typer.Option(
        None,
        "--base",
        help="Base model (folder, .gguf, pkg:PACKAGE/FILE, hub id); default: the run's.",
    ),
    test: Path | None = typer.Option(
        None,
        "--test",
        help="Held-out file with reference responses; default: the run's test.jsonl.",
    ),
    limit: int = typer.Option(0, help="Evaluate this many records, spread over the file (0: all)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output folder; default: RUN/eval with --run."
    ),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output folder."),
    template: str | None = typer.Option(
        None, "--template", help="Prompt template, alpaca or chat; default: the run's."
    ),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(8, help="Prompts per generate call and examples per loss pass."),
    preset: str | None = typer.Option(
        None,
        "--preset",
        help=f"Decode with a serving preset ({', '.join(PRESETS)}) instead of plain greedy.",
    ),
    repetition_penalty: float | None = typer.Option(None, help="Repetition penalty (1: off)."),
    max_new_tokens: int | None = typer.Option(None, help="Answer length limit (default 128)."),
    show: int = typer.Option(
        3, help="Sample answers printed, decoded with the serving defaults (0: none)."
    ),
) -> None:
    """Score adapters and their base model side by side on held-out records: loss, ROUGE-L,
    repetition, length; writes eval.json, answers.jsonl and comparison.png."""
    from covey.console import console, quiet_libraries, share_the_cpu
    from covey.eval.report import categories_table, models_table, samples_table
    from covey.eval.run import EvalOptions, choose_sources, decoding_settings, run_eval

    share_the_cpu()
    if out is None:
        if run is None:
            raise ConfigError("--out: name the folder for eval.json (no --run to write into)")
        out = run / "eval"
    options = EvalOptions(
        out=out,
        test=test,
        settings=decoding_settings(preset, repetition_penalty, max_new_tokens),
        batch_size=batch_size,
        limit=limit,
        show=show,
        overwrite=overwrite,
    )
    options.check()
    sources = choose_sources(run, rounds, adapters, base, template, device)
    quiet_libraries()
    with console.status(f"evaluating {len(sources)} adapter(s) and the base model"):
        result = run_eval(sources, options)
    console.print(models_table(result.summary))
    console.print(categories_table(result.summary))
    samples = samples_table(result.summary)
    if samples is not None:
        console.print(samples)
    console.print(f"wrote {out}/ (eval.json, answers.jsonl, comparison.png)")
