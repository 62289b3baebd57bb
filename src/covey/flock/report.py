"""FLock run figures and tables: stake + earnings per participant, roles, votes, outcomes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
from rich.table import Table


def plot_rewards(summary: dict[str, Any], path: Path) -> None:
    """Each participant's net token change after every round (malicious ones dashed, red)."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    rounds = summary["rounds"]
    for p in summary["participants"]:
        i = p["participant"]
        nets = [next(b["net"] for b in r["balances"] if b["participant"] == i) for r in rounds]
        colour, line = ("tab:red", "--") if p["attacker"] else ("tab:blue", "-")
        ax.plot(range(len(rounds)), nets, marker="o", alpha=0.8, color=colour, linestyle=line)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("net tokens (stake + rewards - start)")
    ax.set_title("FLock rewards and slashes (blue honest, red dashed malicious)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def flock_round_table(record: dict[str, Any]) -> Table:
    """Roles, votes, outcome, rewards and slashes of one FLock round."""
    f = record["flock"]
    table = Table(title=f"FLock round {record['round']}: {f['outcome']}")
    for name in ("participant", "role", "attacker", "vote / verdict", "reward", "slash", "net"):
        table.add_column(name, justify="right")
    roles = {i: "proposer" for i in f["proposers"]} | {i: "voter" for i in f["voters"]}
    # a ballot judges every proposal, in the order of f["proposers"]: + accept, - reject
    votes = {v["participant"]: "".join("+" if a else "-" for a in v["accepts"]) for v in f["votes"]}
    verdicts = {p["participant"]: ("rejected", "accepted")[p["accepted"]] for p in f["proposals"]}
    rewards = {r["participant"]: r["amount"] for r in f["rewards"]}
    slashes = {s["participant"]: s["amount"] for s in f["slashes"]}
    for b in f["balances"]:
        i = b["participant"]
        table.add_row(
            str(i),
            roles.get(i, "-"),
            "yes" if b["attacker"] else "",
            votes.get(i) or verdicts.get(i, "-"),
            f"{rewards[i]:.2f}" if i in rewards else "",
            f"{slashes[i]:.2f}" if i in slashes else "",
            f"{b['net']:+.2f}",
        )
    return table


def balances_table(flock_json: Path) -> Table:
    """Final token positions after every participant claimed and withdrew."""
    import json

    summary = json.loads(flock_json.read_text())
    table = Table(title="FLock balances after the task (tokens)")
    for name in ("participant", "attacker", "wallet", "net change"):
        table.add_column(name, justify="right")
    for b in summary["settled"]:
        table.add_row(
            str(b["participant"]), "yes" if b["attacker"] else "", f"{b['wallet']:.2f}",
            f"{b['net']:+.2f}",
        )  # fmt: skip
    return table
