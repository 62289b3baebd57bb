"""FLock run figures and tables: stake + earnings per participant, roles, votes, outcomes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from covey.fed.runfolder import RoundRecord


def honest_votes(rounds: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """What honest voters' ballots said about honest and about malicious proposals: how many
    votes, how many rejected, and why (a voter's own-loss test or the round-relative rule).
    The rejected honest votes over all honest votes is the voters' false-positive rate.
    `rounds`: flock.json's played rounds (`["rounds"][1:]`; round 0 is the setup)."""
    tally: dict[str, dict[str, int]] = {}
    for played in rounds:
        for vote in played["votes"]:
            if vote["attacker"] or not vote.get("revealed", True):
                continue
            for proposal, accept, reason, view in zip(
                played["proposals"], vote["accepts"], vote["reasons"] or [], vote["round_views"]
                or [None] * len(played["proposals"]), strict=False,
            ):  # fmt: skip
                if not proposal.get("valid", True) or reason is None:
                    continue  # unrevealed or unreadable: not a judgement
                kind = "on_malicious" if proposal["attacker"] else "on_honest"
                counts = tally.setdefault(kind, {"votes": 0, "rejected": 0, "by_round_rule": 0})
                counts["votes"] += 1
                if not accept:
                    counts["rejected"] += 1
                    counts["by_round_rule"] += bool(view and view.get("reason"))
    return tally


def plot_rewards(summary: dict[str, Any], path: Path) -> None:
    """Each participant's net token change after every round (malicious ones dashed, red)."""
    from matplotlib.figure import Figure  # not pyplot's: no backend to switch

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
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


ROUND_COLUMNS = ("participant", "role", "attacker", "ballot / verdict", "reward", "slash", "net")
"""One row per participant and round: its role, its ballot (voters: + accept, - reject, one
sign per proposal in draw order) or its proposal's verdict (proposers), tokens credited and
slashed in the round, and its net change since it staked."""


def round_rows(f: dict[str, Any]) -> list[list[Any]]:
    """The ROUND_COLUMNS rows of one FLock round record's `flock` part (none for round 0,
    before any vote)."""
    if "proposers" not in f:
        return []
    roles = {i: "proposer" for i in f["proposers"]} | {i: "voter" for i in f["voters"]}
    ballots = {v["participant"]: "".join("+-"[not a] for a in v["accepts"]) for v in f["votes"]}
    verdicts = {p["participant"]: ("rejected", "accepted")[p["accepted"]] for p in f["proposals"]}
    rewards = {r["participant"]: r["amount"] for r in f["rewards"]}
    slashes = {s["participant"]: s["amount"] for s in f["slashes"]}
    rows = []
    for b in f["balances"]:
        i = b["participant"]
        rows.append(
            [
                i,
                roles.get(i, "-"),
                "yes" if b["attacker"] else "",
                ballots.get(i) or verdicts.get(i, "-"),
                round(rewards[i], 4) if i in rewards else None,
                round(slashes[i], 4) if i in slashes else None,
                round(b["net"], 4),
            ]
        )
    return rows


def flock_round_table(record: RoundRecord) -> Table:
    """Roles, ballots, verdicts, rewards and slashes of one FLock round."""
    flock = record.engine["flock"]
    table = Table(title=f"FLock round {record.round}: {flock['outcome']}")
    for name in ROUND_COLUMNS:
        table.add_column(name, justify="right")
    for row in round_rows(flock):
        *head, reward, slash, net = row
        table.add_row(
            *map(str, head),
            "" if reward is None else f"{reward:.2f}",
            "" if slash is None else f"{slash:.2f}",
            f"{net:+.2f}",
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
