"""The per-client category composition figure (cf. FedIT's data-heterogeneity figure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure


def plot_distribution(manifest: dict[str, Any], path: Path) -> None:
    """Stacked bars: one per client, one colour per category, height = record count."""
    categories = manifest["categories"]
    clients = manifest["clients"]
    # a Figure of its own, not pyplot's: no backend to switch (savefig renders with Agg)
    fig = Figure(figsize=(max(6.0, 0.25 * len(clients) + 3), 4.5), dpi=120)
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab10" if len(categories) <= 10 else "tab20"]
    bottoms = [0] * len(clients)
    x = list(range(len(clients)))
    for k, category in enumerate(categories):
        heights = [c["by_category"].get(category, 0) for c in clients]
        ax.bar(x, heights, bottom=bottoms, color=colours(k % colours.N), label=category, width=0.8)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_xlabel("client")
    ax.set_ylabel("training records")
    ax.set_title(f"{manifest['scheme']} split, {len(clients)} clients, seed {manifest['seed']}")
    if len(clients) <= 30:
        ax.set_xticks(x)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
    fig.tight_layout()
    fig.savefig(path)
