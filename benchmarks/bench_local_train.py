"""Local-training throughput: Covey's `train_local` against a bare PyTorch loop.

Both run the same optimizer steps (same micro-batches laid out the same way, same loss
computation, same model, same AdamW) in one process, alternated A B A B ... after a warm-up, so
machine noise hits both alike. The bare loop is what a person would write by hand around
Covey's micro-batch math (`make_batch`, `summed_loss`): forward, backward, clip, step. Covey's
extra work (copying the global adapter in, the LR schedule, bookkeeping, copying the adapter out)
is what the ratio measures; how much less the micro-batch math computes than a stock Trainer is
`bench_vs_trainer.py`'s question. Writes benchmarks/results/local_train_<device>.json.

    .venv/bin/python benchmarks/bench_local_train.py                  # SmolLM2 GGUF, CPU
    python benchmarks/bench_local_train.py --random-init --device cuda   # on a GPU machine

`--random-init` builds the model from SmolLM2-135M's architecture with random weights (no
download needed): throughput does not depend on the weights' values.
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

import numpy as np
import torch

from covey.config import LoraSettings, ModelConfig, PromptConfig, TrainConfig
from covey.data.prompts import tokenize_records
from covey.data.records import load_records
from covey.data.split import bundled_sample_path
from covey.model.lora import adapter_state, wrap_with_lora
from covey.train.local import plan_steps, train_local
from covey.train.loss import summed_loss
from covey.train.packing import make_batch, packs_by_default

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_ARCH = {  # SmolLM2-135M-Instruct's config.json, for --random-init
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
}


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from covey.model.loading import load_base_model, resolve_device, resolve_dtype

    if not args.random_init:
        return load_base_model(ModelConfig(base=args.base, device=args.device))
    from tests.model.tiny import make_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_ARCH))
    model.to(device=device, dtype=resolve_dtype("auto", device)).eval()
    # a byte-level tokenizer: sequences get longer than SmolLM2's, not different in kind
    return model, make_tiny_tokenizer()


def bare_loop(model: Any, examples: list, steps: list, cfg: TrainConfig, pad_id: int) -> int:
    """The reference: the same steps, written plainly."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    tokens = 0
    packed = packs_by_default(model)
    for micro_batches in steps:
        optimizer.zero_grad(set_to_none=True)
        targets = sum(examples[i].num_target_tokens for mb in micro_batches for i in mb)
        for micro in micro_batches:
            batch = make_batch([examples[i] for i in micro], pad_id, device, packed)
            (summed_loss(model, batch) / targets).backward()
            tokens += batch.tokens
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
    model.eval()
    return tokens


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default=ModelConfig().base)
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = load_model(args)
    torch.manual_seed(0)
    peft = wrap_with_lora(model, LoraSettings(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    device = next(peft.parameters()).device
    records = load_records(bundled_sample_path()).records
    template = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    prompt = PromptConfig(template=template, train_on_inputs=False, cutoff_len=args.cutoff)
    examples = tokenize_records(records, tokenizer, prompt)
    cfg = TrainConfig(batch_size=args.batch, micro_batch_size=args.micro, max_steps=args.steps)
    steps = plan_steps([len(e.input_ids) for e in examples], cfg, np.random.default_rng(0))
    start = adapter_state(peft)

    def covey_run() -> tuple[float, int]:
        sync(device)
        t = time.perf_counter()
        result = train_local(peft, examples, start, cfg, seed=0, pad_id=tokenizer.pad_token_id)
        sync(device)
        return time.perf_counter() - t, int(result.metrics["tokens"])

    def bare_run() -> tuple[float, int]:
        sync(device)
        t = time.perf_counter()
        tokens = bare_loop(peft, examples, steps, cfg, tokenizer.pad_token_id)
        sync(device)
        return time.perf_counter() - t, tokens

    covey_run(), bare_run()  # warm-up (allocator, kernels, caches)
    pairs = []
    for _ in range(args.repeats):
        (tc, nc), (tb, nb) = covey_run(), bare_run()
        assert nc == nb, "both loops must process the same tokens"
        pairs.append({"covey_s": tc, "bare_s": tb, "tokens": nc, "ratio": tb / tc})
    ratios = [p["ratio"] for p in pairs]
    n_params = sum(p.numel() for p in peft.parameters())
    tps = statistics.median(p["tokens"] / p["covey_s"] for p in pairs)
    result = {
        "command": "python benchmarks/bench_local_train.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (False, None)
        ),
        "model": "SmolLM2-135M architecture, random init" if args.random_init else args.base,
        "params": n_params,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(next(peft.parameters()).dtype),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min_at_end": os.getloadavg()[0],
        "steps": len(steps),
        "batch": args.batch,
        "micro_batch": args.micro,
        "cutoff_len": args.cutoff,
        "pairs": pairs,
        "covey_tokens_per_s_median": tps,
        "throughput_ratio_covey_over_bare_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }
    if device.type == "cuda":  # LoRA on a frozen base: about 4 * N FLOPs per token (fwd + bwd)
        result["model_tflops_per_s"] = 4 * n_params * tps / 1e12
    out = ROOT / "benchmarks" / "results" / f"local_train_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
