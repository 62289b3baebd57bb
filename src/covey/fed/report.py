"""What a run shows a person: the loss plot, the per-round table, before/after answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
from rich.table import Table


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Held-out loss per round (round 0 = before training) and clients' mean training loss."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    rounds = [r["round"] for r in records]
    ax.plot(rounds, [r["eval"]["loss"] for r in records], "o-", label="held-out loss (global)")
    trained = [r for r in records if r.get("train")]
    if trained:
        ax.plot(
            [r["round"] for r in trained],
            [r["train"]["loss"] for r in trained],
            "s--",
            label="clients' training loss (mean)",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("loss (nats/token)")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def rounds_table(records: list[dict[str, Any]]) -> Table:
    table = Table(title="federated rounds")
    for name in ("round", "clients", "rejected", "train loss", "held-out loss", "perplexity", "s"):
        table.add_column(name, justify="right")
    for r in records:
        train = r.get("train") or {}
        seconds = r.get("seconds", {}).get("round")
        table.add_row(
            str(r["round"]),
            str(len(r.get("clients", []))),
            str(len(r.get("rejected", []))),
            f"{train['loss']:.4f}" if "loss" in train else "-",
            f"{r['eval']['loss']:.4f}",
            f"{r['eval']['perplexity']:.2f}",
            f"{seconds:.1f}" if seconds is not None else "-",
        )
    return table


def answers_table(before: dict[str, Any], after: dict[str, Any]) -> Table:
    table = Table(title=f"held-out instructions: round {before['round']} vs round {after['round']}")
    table.add_column("instruction", ratio=2)
    table.add_column(f"round {before['round']}", ratio=3)
    table.add_column(f"round {after['round']}", ratio=3)
    for b, a in zip(before.get("answers", []), after.get("answers", []), strict=True):
        table.add_row(b["instruction"], b["answer"], a["answer"])
    return table
