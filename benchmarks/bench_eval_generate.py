"""Time `covey eval`'s answers: the base and N adapters one model at a time (as before) or all in
one mixed-adapter batch per `generate` call (`covey.model.generate.generate_ids`, as now).

On the demo base (SmolLM2-135M-Instruct, `model.base`'s default) with N random LoRA adapters
(r=8 on q_proj and v_proj, B ~ N(0, 0.02^2): answers that differ from the base's), greedy as
`covey eval` decodes (no repetition penalty), on the first `--records` held-out Dolly records
(/work/shared or `--test`). Checks that both ways give the same answers, then writes the seconds
of each way (median of `--repeats`, alternating) to benchmarks/results/eval_generate.json.

    .venv/bin/python benchmarks/bench_eval_generate.py [--adapters 2] [--records 16]
        [--max-new-tokens 32] [--batch-size 8] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from covey.config import ModelConfig
from covey.data.records import load_records
from covey.model.generate import answer_records
from covey.model.loading import load_base_model

ROOT = Path(__file__).resolve().parents[1]
DOLLY_TEST = ROOT.parent / "shared" / "data" / "dolly" / "dolly-test-80.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--records", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--test", type=Path, default=DOLLY_TEST)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/eval_generate.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_base_model(ModelConfig())
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    names = [f"adapter_{k}" for k in range(args.adapters)]
    peft: Any = get_peft_model(model, lora, adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, lora)
    for k, name in enumerate(names):
        torch.manual_seed(k + 1)
        for key, parameter in peft.named_parameters():
            if f"lora_B.{name}." in key:
                parameter.data = torch.randn_like(parameter) * 0.02
    peft.eval()
    records = load_records(args.test).records[: args.records]
    everyone: list[str | None] = [None, *names]
    kwargs = {"max_new_tokens": args.max_new_tokens, "repetition_penalty": 1.0}

    def one_at_a_time() -> list[list[str]]:
        return [
            answer_records(peft, tokenizer, records, "chat", kwargs, args.batch_size, [who])[0]
            for who in everyone
        ]

    def mixed() -> list[list[str]]:
        return answer_records(peft, tokenizer, records, "chat", kwargs, args.batch_size, everyone)

    seconds: dict[str, list[float]] = {"one_model_at_a_time": [], "mixed_adapter_batches": []}
    answers: dict[str, list[list[str]]] = {}
    for _ in range(args.repeats):
        for label, way in (
            ("one_model_at_a_time", one_at_a_time),
            ("mixed_adapter_batches", mixed),
        ):
            started = time.perf_counter()
            answers[label] = way()
            seconds[label].append(time.perf_counter() - started)
            print(label, round(seconds[label][-1], 2), flush=True)
    same = answers["one_model_at_a_time"] == answers["mixed_adapter_batches"]
    medians = {label: statistics.median(values) for label, values in seconds.items()}
    result = {
        "models": len(everyone),
        "records": len(records),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "seconds": seconds,
        "median_seconds": medians,
        "speedup": medians["one_model_at_a_time"] / medians["mixed_adapter_batches"],
        "same_answers": same,
        "distinct_answers": len({a for model in answers["mixed_adapter_batches"] for a in model}),
        "machine": {"cpu": platform.processor(), "cores": os.cpu_count()},
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_seconds", "speedup", "same_answers")}))
    if not same:
        raise SystemExit("the two ways gave different answers")


if __name__ == "__main__":
    main()
