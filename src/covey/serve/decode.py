"""Faster token-by-token decoding on a CPU, with the same numbers.

A decoding step multiplies one or two hidden vectors (one per pane) by every weight matrix of
the model. The largest is the output projection (SmolLM2-135M: 49,152 x 576, a fifth of the
model's bytes), and for it MKL's kernel is slow on the `x @ W.T` that `nn.Linear` asks for
when the batch has two rows: 57 ms against 29 ms for the same product with the weight stored
transposed, `x @ W_t` (2 shared cores; `benchmarks/bench_generate.py` measures the whole
answer). `transpose_output_projection` swaps the model's output projection for one that keeps
such a copy. The products agree to float rounding (greedy answers are identical, tested), at
the cost of one more copy of that matrix in memory (113 MB for SmolLM2-135M); the input
embedding it may be tied to keeps its own weight. Only for inference: the copy is not trained.

`decoding_threads` sets how many threads torch's CPU kernels use while the commands answer
(`--threads`; 0 keeps torch's default, every core this process may use). Decoding is a chain
of small, memory-bound products (one or two rows against every weight): on the idle 2-core
machine a second thread gains nothing (`covey generate --both`, 128 tokens: 18.1 s median with
2 threads, 18.0 s with 1, `benchmarks/bench_generate.py`), and on a busy machine every
parallel region waits for the slowest thread, so one thread is the better choice there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class TransposedLinear(nn.Module):
    """`nn.Linear`'s map computed from a transposed, contiguous copy of its weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        # A buffer, not a parameter: not trained, not saved (persistent=False), follows .to().
        self.weight_t: torch.Tensor
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous(), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = hidden @ self.weight_t
        return out if self.bias is None else out + self.bias


def transpose_output_projection(model: Any) -> bool:
    """On a CPU, replace the (PEFT or plain) causal LM's output projection by a
    `TransposedLinear`. Does nothing (returns False) on other devices, where the library's
    kernels do not need it, or when the projection is not a plain `nn.Linear` (an adapter
    on it, or a quantized layer)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear or head.weight.device.type != "cpu":
        return False
    base.set_output_embeddings(TransposedLinear(head))
    return True


@contextlib.contextmanager
def decoding_threads(threads: int, device: torch.device) -> Iterator[int]:
    """While the block runs, torch's CPU kernels use `threads` threads (0: torch's default)
    when the model is on the CPU; on other devices it changes nothing. Restores the previous
    count afterwards, so an in-process caller (tests, a notebook) keeps its own. Yields the
    count in force."""
    before = torch.get_num_threads()
    if device.type != "cpu" or threads == 0:
        yield before
        return
    torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
