"""Micro-batches as tensors, padded or packed, with each position's next-token target.

Two layouts give the same loss and gradients:
- padded: one row per example, right-padded to the longest, with an attention mask;
- packed: the examples end to end in one row, no padding. Position ids restart at 0 for each
  example and no attention mask is passed, from which transformers builds a block-diagonal
  causal mask (flash-attention's variable-length kernels on CUDA read the same position ids),
  so attention stays inside each example.

Targets are shifted inside each example before the layout: position t of an example predicts its
token t + 1, and its last position predicts nothing. No position predicts across a boundary
between packed examples or into padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from covey.data.prompts import IGNORE_INDEX, Example

PACK_ON_CPU = True
"""Measured on 2 CPU cores (benchmarks/bench_vs_trainer.py): packing removes the padding's
compute, which outweighs attending over the whole packed row at these lengths."""


def packs_by_default(model: Any) -> bool:
    """Whether `train_local` and evaluation pack micro-batches for `model` unless told.

    On CPU, `PACK_ON_CPU`. On CUDA only with flash-attention, whose variable-length kernels
    attend inside each packed example and nowhere else; with SDPA the block-diagonal mask rules
    out its flash kernel, and that trade has not been measured yet, so batches stay padded
    (length-grouped) there.
    """
    device = next(model.parameters()).device
    if device.type == "cpu":
        return PACK_ON_CPU
    attention = str(getattr(getattr(model, "config", None), "_attn_implementation", ""))
    return device.type == "cuda" and attention.startswith("flash_attention")


@dataclass
class Batch:
    """A micro-batch ready for the model."""

    input_ids: torch.Tensor
    """(rows, width) token ids."""
    targets: torch.Tensor
    """(rows, width): the token each position must predict, IGNORE_INDEX where none is learned."""
    example_index: torch.Tensor
    """(rows, width): which of the batch's examples each position belongs to, -1 for padding."""
    attention_mask: torch.Tensor | None
    """Padded layout: 1 for real tokens, 0 for padding."""
    position_ids: torch.Tensor | None
    """Packed layout: each example's positions, restarting at 0."""
    tokens: int
    """Real (non-pad) tokens."""

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model's forward."""
        inputs = {"input_ids": self.input_ids}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        return inputs


def next_token_targets(example: Example) -> list[int]:
    """The label of the next token at each position; the last position predicts nothing."""
    return [*example.labels[1:], IGNORE_INDEX]


def pad_batch(examples: Sequence[Example], pad_id: int, device: torch.device) -> Batch:
    """One row per example, right-padded to the longest."""
    width = max(len(e.input_ids) for e in examples)
    shape = (len(examples), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    owner = torch.full(shape, -1, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        targets[row, :n] = torch.tensor(next_token_targets(e))
        owner[row, :n] = row
        mask[row, :n] = 1
    return Batch(
        input_ids=ids.to(device),
        targets=targets.to(device),
        example_index=owner.to(device),
        attention_mask=mask.to(device),
        position_ids=None,
        tokens=sum(len(e.input_ids) for e in examples),
    )


def pack_batch(examples: Sequence[Example], device: torch.device) -> Batch:
    """All examples end to end in one row, each with its own positions."""
    ids = [t for e in examples for t in e.input_ids]
    targets = [t for e in examples for t in next_token_targets(e)]
    owner = [i for i, e in enumerate(examples) for _ in e.input_ids]
    positions = [p for e in examples for p in range(len(e.input_ids))]

    def row(values: list[int]) -> torch.Tensor:
        return torch.tensor([values], dtype=torch.long, device=device)

    return Batch(
        input_ids=row(ids),
        targets=row(targets),
        example_index=row(owner),
        attention_mask=None,
        position_ids=row(positions),
        tokens=len(ids),
    )


def make_batch(
    examples: Sequence[Example], pad_id: int, device: torch.device, packed: bool
) -> Batch:
    """`pack_batch` or `pad_batch`."""
    return pack_batch(examples, device) if packed else pad_batch(examples, pad_id, device)
