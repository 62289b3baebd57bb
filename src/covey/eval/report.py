"""What `covey eval` shows a person: the comparison tables and figure, from eval.json."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.0f}%"


def models_table(summary: dict[str, Any]) -> Table:
    """One row per model: loss, perplexity, ROUGE-L (± standard error), its gain over the base
    on the same records, heavy repetition, distinct-2, mean answer length."""
    test = summary["test"]
    table = Table(
        title=f"{test['records']} held-out records of {test['file']}",
        caption=f"answers: {summary['generation']['described']}; {summary['scoring']['rouge_l']}; "
        f"heavy repetition: {summary['scoring']['heavy_repetition']}",
    )
    for name in ("model", "held-out loss", "perplexity", "ROUGE-L F1", "vs base",
                 "heavy repetition", "distinct-2", "words"):  # fmt: skip
        table.add_column(name, justify="left" if name == "model" else "right")
    for m in summary["models"]:
        gain = m.get("rouge_l_vs_base")
        table.add_row(
            m["name"],
            f"{m['loss']:.4f}",
            f"{m['perplexity']:.2f}",
            f"{m['rouge_l']:.3f} ± {m['rouge_l_stderr']:.3f}",
            f"{gain['mean']:+.3f} ± {gain['stderr']:.3f}" if gain else "",
            _pct(m["heavy_repetition"]),
            f"{m['distinct_2']:.3f}",
            f"{m['mean_words']:.1f}",
        )
    return table


def categories_table(summary: dict[str, Any]) -> Table:
    """ROUGE-L F1 per category (answers in brackets), one column per model."""
    models = summary["models"]
    table = Table(title="ROUGE-L F1 by category")
    table.add_column("category")
    for m in models:
        table.add_column(m["name"], justify="right")
    for category, first in models[0]["by_category"].items():
        cells = [f"{m['by_category'][category]['rouge_l']:.3f}" for m in models]
        table.add_row(f"{category} ({int(first['answers'])})", *cells)
    return table


def samples_table(summary: dict[str, Any]) -> Table | None:
    """The sample answers with the serving defaults, side by side."""
    samples = summary["samples"]
    if not samples["answers"]:
        return None
    names = [m["name"] for m in summary["models"]]
    table = Table(title=f"sample answers ({samples['described']})")
    table.add_column("instruction", ratio=2)
    for name in names:
        table.add_column(name, ratio=3)
    for row in samples["answers"]:
        table.add_row(row["instruction"], *(row["answers"][n] for n in names))
    return table


def plot_comparison(summary: dict[str, Any], path: Path) -> None:
    """Left: ROUGE-L F1 per category and overall, a bar per model. Right: heavy repetition."""
    from matplotlib.figure import Figure  # not pyplot's: no backend to switch

    models = summary["models"]
    categories = [*models[0]["by_category"], "all"]
    fig = Figure(figsize=(11, 4.2), dpi=110)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [4, 1]})
    width = 0.8 / len(models)
    for k, m in enumerate(models):
        values = [m["by_category"][c]["rouge_l"] for c in categories[:-1]] + [m["rouge_l"]]
        x = [i + (k - (len(models) - 1) / 2) * width for i in range(len(categories))]
        left.bar(x, values, width=width, label=m["name"], color=f"C{k}")
        right.bar([k], [100 * m["heavy_repetition"]], width=0.6, color=f"C{k}")
    left.set_xticks(range(len(categories)))
    left.set_xticklabels([c.replace("_", " ") for c in categories], rotation=30, ha="right")
    left.set_ylabel("ROUGE-L F1")
    left.set_title(f"{summary['test']['records']} held-out records")
    left.grid(axis="y", alpha=0.3)
    left.legend(fontsize=8)
    right.set_xticks(range(len(models)))
    right.set_xticklabels([m["name"] for m in models], rotation=30, ha="right")
    right.set_ylabel("answers with heavy repetition (%)")
    right.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
