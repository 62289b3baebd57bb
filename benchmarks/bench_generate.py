"""Time `covey generate --both` and the UI's streaming path on a trained run, per preset.

Measures what a user waits for, on the demo's SmolLM2-135M run (`make demo` writes
runs/demo/train), at 128 new tokens:

- the CLI: `covey generate "Name three primary colors." --run RUN --both` in a fresh process,
  repeated: from launch, the time until the model is loaded (its "generation:" line on
  stderr), until the first answer character on stdout, until both answers are on the screen
  (`answered_s`: the second pane prints whole when both are complete) and until it exits
  (`wall_s`: Python's exit with torch loaded adds ~1 s); the tokens of both answers per second
  of generation (from loaded to answered); the same with `--threads 1` for reference;
- the UI: a `covey serve` process, asked through its HTTP API (`/compare`, as the browser
  does) with gradio_client once it is up; the time until the first token shows in each pane,
  the time until both answers are complete, and the tokens of both answers per second of it;
- loops: on held-out instructions of the run's test set, the share of answers whose distinct
  bigrams fall below half of all bigrams (an answer going round in a loop), base and tuned
  (`--loop-instructions 0` skips it).

Results go to benchmarks/results/generate.json (with the machine and versions).

    .venv/bin/python benchmarks/bench_generate.py [--run runs/demo/train] [--repeats 3]
        [--presets greedy,shepherd] [--loop-instructions 24] [--reference-threads 1]
        [--wait-reference]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = "Name three primary colors."


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def cpu_seconds(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def time_cli(
    run: Path,
    preset: str,
    tokenizer: Any,
    wait_policy: str | None = None,
    threads: int | None = None,
) -> dict[str, float | int]:
    """One `covey generate --both` in a fresh process, read as it prints. `wait_policy`
    overrides the OpenMP wait policy that `covey generate` picks (PASSIVE); "" keeps
    libgomp's own default (spin a while, then sleep), as before Covey set one. `threads`
    passes `--threads` (None: the command's default)."""
    command = [sys.executable, "-m", "covey", "generate", INSTRUCTION, "--run", str(run)]
    command += ["--both", "--preset", preset, "--max-new-tokens", "128"]
    if threads is not None:
        command += ["--threads", str(threads)]
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_WAIT_POLICY", None)
    if wait_policy is not None:
        env["OMP_WAIT_POLICY"] = wait_policy  # "": libgomp warns once and keeps its default
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert process.stdout is not None and process.stderr is not None
    streams = {process.stdout: b"", process.stderr: b""}
    loaded = first = answered = None
    header = b"--- base model ---\n"
    with selectors.DefaultSelector() as selector:
        for stream in streams:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            for key, _ in selector.select():
                chunk = os.read(key.fd, 4096)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                streams[key.fileobj] += chunk  # type: ignore[index]
                now = time.perf_counter() - started
                if loaded is None and b"generation:" in streams[process.stderr]:
                    loaded = now  # printed once the model is loaded, before generating
                if first is None and len(streams[process.stdout]) > len(header):
                    first = now
                if (
                    answered is None
                    and streams[process.stdout].endswith(b"\n")
                    and (b"\n--- fine-tuned" in streams[process.stdout])
                ):
                    answered = now  # the second pane prints whole once both are complete
    returncode = process.wait()
    wall = time.perf_counter() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # this process's waited children
    assert returncode == 0, f"{' '.join(command)} failed: {streams[process.stderr]!r}"
    assert loaded is not None and first is not None and answered is not None, (
        f"unexpected output: {streams}"
    )
    text = streams[process.stdout].decode()
    base, _, tuned = text.removeprefix(header.decode()).partition("\n--- fine-tuned")
    tuned = tuned.split("---\n", 1)[1] if "---\n" in tuned else tuned
    tokens = len(tokenizer(base.strip())["input_ids"]) + len(tokenizer(tuned.strip())["input_ids"])
    return {
        "wall_s": round(wall, 2),
        # CPU time it used on all cores: above wall_s, more than one core was busy
        "cpu_s": round(cpu_seconds(children) - cpu_seconds(before), 2),
        "loaded_s": round(loaded, 2),
        "first_token_s": round(first, 2),
        # both answers on the screen; the rest of wall_s is the interpreter's exit (~1 s)
        "answered_s": round(answered, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / (answered - loaded), 1),
    }


def medians(runs: list[dict[str, float | int]]) -> dict[str, Any]:
    """The median of each timed figure over repeated CLI runs, with the runs themselves."""
    keys = ("wall_s", "cpu_s", "loaded_s", "first_token_s", "answered_s", "tokens_per_s")
    return {f"{key}_median": statistics.median(r[key] for r in runs) for key in keys} | {
        "runs": runs
    }


def time_ui(run: Path, preset: str, tokenizer: Any) -> dict[str, Any]:
    """One question to a `covey serve` process through its HTTP API, as the browser asks it;
    timed from the question, with the server already up."""
    from gradio_client import Client

    from covey.model.generate import PRESETS
    from covey.serve.app import control_values

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    command = [sys.executable, "-m", "covey", "serve", "--run", str(run), "--port", str(port)]
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_WAIT_POLICY", None)  # as a user starts it
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    server = subprocess.Popen(command, env=env, **quiet)  # type: ignore[call-overload]
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 900
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "covey serve failed"
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                time.sleep(1)
        client = Client(url, verbose=False)
        controls = control_values(PRESETS[preset])
        started = time.perf_counter()
        job = client.submit(INSTRUCTION, "", *controls, api_name="/compare")  # states stay inside
        first: dict[str, float] = {}
        last: Any = None
        for update in job:
            now = time.perf_counter() - started
            for pane, history in zip(("base", "tuned"), update[:2], strict=True):
                text = _last_message(history)
                if pane not in first and text not in ("", "…"):
                    first[pane] = round(now, 2)
            last = update
        total = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=60)
    answers = [_last_message(last[0]), _last_message(last[1])]
    tokens = sum(len(tokenizer(a)["input_ids"]) for a in answers)
    return {
        "first_token_s": first,
        "complete_s": round(total, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / total, 1),
    }


def _last_message(history: list[dict[str, Any]]) -> str:
    """The text of a chat pane's last message (the API sends content as a list of parts)."""
    content = history[-1]["content"] if history else ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return str(content)


def loop_share(session: Any, preset: str, limit: int) -> dict[str, Any]:
    """Share of held-out answers that loop (distinct bigrams below half), base and tuned."""
    from covey.data.records import load_records
    from covey.model.generate import PRESETS
    from covey.serve.generate import BASE, TUNED

    records = load_records(Path(session.source.cfg.data.dir) / "test.jsonl").records
    step = max(1, len(records) // limit)
    picked = records[::step][:limit]
    looping = {"base": 0, "tuned": 0}
    for record in picked:
        *_, answers = session.stream(record.instruction, record.context, PRESETS[preset],
                                     (BASE, TUNED))  # fmt: skip
        for pane, answer in zip(("base", "tuned"), answers, strict=True):
            words = answer.split()
            bigrams = list(itertools.pairwise(words))
            if bigrams and len(set(bigrams)) / len(bigrams) < 0.5:
                looping[pane] += 1
    return {"instructions": len(picked), "looping": looping}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs/demo/train")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", default="greedy,shepherd")
    parser.add_argument("--loop-instructions", type=int, default=24)
    parser.add_argument(
        "--reference-threads",
        type=int,
        default=1,
        help="also time greedy with this many decoding threads (0: skip)",
    )
    parser.add_argument(
        "--wait-reference",
        action="store_true",
        help="also time greedy with libgomp's default wait policy (slow on a busy machine)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/generate.json")
    args = parser.parse_args()

    import torch
    import transformers

    from covey.console import quiet_libraries
    from covey.serve.adapters import resolve_source
    from covey.serve.generate import load_session

    quiet_libraries()
    load_at_start = round(os.getloadavg()[0], 2)  # the machine is shared: say how busy it was
    session = load_session(resolve_source(run=args.run))
    tokenizer = session.tokenizer
    results: dict[str, Any] = {}
    for preset in args.presets.split(","):
        cli = [time_cli(args.run, preset, tokenizer) for _ in range(args.repeats)]
        print(preset, "cli", json.dumps(cli), flush=True)
        ui = time_ui(args.run, preset, tokenizer)
        print(preset, "ui", json.dumps(ui), flush=True)
        results[preset] = {
            "cli": medians(cli),
            "ui": ui,
            "loops": loop_share(session, preset, args.loop_instructions)
            if args.loop_instructions
            else None,
        }
        print(preset, json.dumps(results[preset]), flush=True)
    if "greedy" in results and args.reference_threads:  # e.g. 1: a busy machine's choice
        others = [
            time_cli(args.run, "greedy", tokenizer, threads=args.reference_threads)
            for _ in range(args.repeats)
        ]
        results["greedy"][f"cli_{args.reference_threads}_threads"] = medians(others)
        print(f"greedy, {args.reference_threads} threads", json.dumps(others), flush=True)
    if "greedy" in results and args.wait_reference:  # as before Covey chose OpenMP's wait policy
        spinning = [time_cli(args.run, "greedy", tokenizer, "") for _ in range(args.repeats)]
        results["greedy"]["cli_libgomp_default_wait"] = medians(spinning)
        print("greedy, libgomp's default wait", json.dumps(spinning), flush=True)
    report = {
        "command": f"covey generate {INSTRUCTION!r} --run {args.run} --both "
        "--preset PRESET --max-new-tokens 128; the Gradio app's /compare",
        "run": str(args.run),
        "model": session.source.cfg.model.base,
        "adapter": session.source.label,
        "max_new_tokens": 128,
        "presets": results,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "load_average_1min": {"start": load_at_start, "end": round(os.getloadavg()[0], 2)},
        "torch_threads": torch.get_num_threads(),  # what `covey generate --threads 0` keeps
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
