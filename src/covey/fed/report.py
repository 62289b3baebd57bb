"""What a run shows a person: the loss plot, the per-round table, before/after answers."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from rich.table import Table

from covey.fed.runfolder import RoundRecord


def plot_losses(records: list[RoundRecord], path: Path) -> None:
    """Held-out loss per round (round 0 = before training) and clients' mean training loss;
    ROUGE-L F1 on its own axis when the rounds score answers (`eval.rouge_examples`)."""
    # a Figure of its own, not pyplot's: no backend to switch, no global figure list, safe in
    # the UI's threads; savefig renders with Agg
    fig = Figure(figsize=(6.6 if _scored(records) else 6, 4), dpi=110)
    ax = fig.subplots()
    rounds = [r.round for r in records]
    ax.plot(rounds, [r.eval["loss"] for r in records], "o-", label="held-out loss (global)")
    trained = [r for r in records if r.train]
    if trained:
        ax.plot(
            [r.round for r in trained],
            [r.train["loss"] for r in trained],
            "s--",
            label="clients' training loss (mean)",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("loss (nats/token)")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    scored = _scored(records)
    if scored:
        rouge = ax.twinx()
        count = scored[-1].eval["rouge_examples"]
        rouge.plot(
            [r.round for r in scored],
            [r.eval["rouge_l"] for r in scored],
            "^:",
            color="C2",
            label=f"ROUGE-L F1 ({count} held-out answers)",
        )
        rouge.set_ylabel("ROUGE-L F1")
        more_handles, more_labels = rouge.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _scored(records: list[RoundRecord]) -> list[RoundRecord]:
    """The rounds whose answers were scored with ROUGE-L."""
    return [r for r in records if "rouge_l" in r.eval]


def rounds_table(records: list[RoundRecord]) -> Table:
    table = Table(title="federated rounds")
    scored = bool(_scored(records))
    columns = ["round", "clients", "rejected", "train loss", "held-out loss", "perplexity"]
    for name in [*columns, *(["ROUGE-L", "repetition"] if scored else []), "s"]:
        table.add_column(name, justify="right")
    for r in records:
        train = r.train
        evaluated = r.eval
        seconds = r.seconds.get("round")
        quality = []
        if scored:
            quality = (
                [f"{evaluated['rouge_l']:.3f}", f"{100 * evaluated['heavy_repetition']:.0f}%"]
                if "rouge_l" in evaluated
                else ["-", "-"]
            )
        table.add_row(
            str(r.round),
            str(len(r.clients)),
            str(len(r.rejected)),
            f"{train['loss']:.4f}" if "loss" in train else "-",
            f"{evaluated['loss']:.4f}",
            f"{evaluated['perplexity']:.2f}",
            *quality,
            f"{seconds:.1f}" if seconds is not None else "-",
        )
    return table


def answers_table(before: RoundRecord, after: RoundRecord, max_new_tokens: int) -> Table:
    table = Table(
        title=f"held-out instructions: round {before.round} vs round {after.round} "
        f"(plain greedy decoding, no repetition penalty, up to {max_new_tokens} new tokens; "
        "`covey eval` scores all held-out records)"
    )
    table.add_column("instruction", ratio=2)
    table.add_column(f"round {before.round}", ratio=3)
    table.add_column(f"round {after.round}", ratio=3)
    for b, a in zip(before.answers, after.answers, strict=True):
        table.add_row(b["instruction"], b["answer"], a["answer"])
    return table
