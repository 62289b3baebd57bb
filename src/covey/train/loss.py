"""Next-token loss computed where it is learned: the output layer sees only target positions.

With the prompt masked, most positions of an instruction example teach nothing (in the demo's
Dolly data 57% of the tokens are prompt), yet a causal LM's forward projects every position onto
the whole vocabulary (49,152 columns for SmolLM2, about a fifth of its FLOPs) and the loss then
throws those logits away. Here the model body runs as usual, the hidden states of the target
positions are selected, and only they go through the output layer and the cross-entropy, in
chunks of `CHUNK_ROWS` positions so that the logits of a long batch never exist all at once.

While training, the chunks' gradient with respect to the hidden states is computed in the same
pass as the loss (softmax minus one-hot, times the output weights), so no logits are kept for
the backward pass and none are computed twice; this needs a plain frozen output layer (LoRA
never trains it). Any other output layer is called as a module on the selected positions.

The body/output-layer split is used only for architectures whose forward is exactly
`logits = lm_head(body(...).last_hidden_state)` (`SPLIT_ARCHITECTURES`); any other model gets
its full logits from its own forward and only the target positions' are kept. Either way the
loss is the full computation's, to float rounding (tests compare losses and gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from covey.data.prompts import IGNORE_INDEX
from covey.train.packing import Batch

SPLIT_ARCHITECTURES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "smollm3", "olmo2"}
)
"""`config.model_type`s whose causal-LM forward applies the output layer, and nothing else, to
the body's last hidden state (checked against transformers' modeling code; Granite, for one,
divides its logits by a scale, and Gemma 2 soft-caps them)."""

CHUNK_ROWS = 1024
"""Target positions per output-layer chunk: 1024 x 49,152 float32 logits are 200 MB."""


def summed_loss(model: Any, batch: Batch, targets_only: bool = True) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's target positions (float32), with
    gradients. `targets_only=False` computes the output layer at every position first, as a
    stock causal-LM forward does (the reference the fast path is tested and measured against).
    """
    rows = _target_rows(model, batch, targets_only)
    head = _output_layer(model)
    if not rows.are_losses and _fusable(head) and torch.is_grad_enabled():
        loss: torch.Tensor = _HeadCrossEntropy.apply(  # type: ignore[no-untyped-call]  # torch's stub
            rows.values, head.weight, head.bias, rows.targets
        )
        return loss
    return _token_losses(rows, head).sum()


@torch.no_grad()
def example_loss_sums(
    model: Any, batch: Batch, num_examples: int, targets_only: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example of the batch: summed target-token loss and number of target tokens (float64,
    on the CPU)."""
    rows = _target_rows(model, batch, targets_only)
    losses = _token_losses(rows, _output_layer(model))
    owner = rows.owner.cpu()
    sums = torch.zeros(num_examples, dtype=torch.float64)
    counts = torch.zeros(num_examples, dtype=torch.float64)
    sums.index_add_(0, owner, losses.double().cpu())
    counts.index_add_(0, owner, torch.ones_like(owner, dtype=torch.float64))
    return sums, counts


def splits_output_layer(model: Any) -> bool:
    """Whether the model's output layer can be applied apart from its body (see the module
    docstring)."""
    return _causal_lm(model).config.model_type in SPLIT_ARCHITECTURES


def _causal_lm(model: Any) -> Any:
    """The transformers causal LM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _output_layer(model: Any) -> Any:
    return _causal_lm(model).get_output_embeddings()


@dataclass
class _TargetRows:
    """The batch's target positions, flattened over rows."""

    values: torch.Tensor
    """The output layer's input at each target position, or its loss when `are_losses`."""
    are_losses: bool
    targets: torch.Tensor
    owner: torch.Tensor
    """Each target position's example index in the batch."""


def _target_rows(model: Any, batch: Batch, targets_only: bool) -> _TargetRows:
    keep = batch.targets != IGNORE_INDEX
    targets, owner = batch.targets[keep], batch.example_index[keep]
    if targets_only and splits_output_layer(model):
        causal_lm = _causal_lm(model)
        body = getattr(causal_lm, causal_lm.base_model_prefix)
        hidden = body(**batch.model_inputs(), use_cache=False).last_hidden_state
        return _TargetRows(hidden[keep], False, targets, owner)
    # the stock computation: logits and a float32 cross-entropy at every position
    logits = model(**batch.model_inputs(), use_cache=False).logits
    losses = F.cross_entropy(
        logits.flatten(0, 1).float(),
        batch.targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return _TargetRows(losses[keep.flatten()], True, targets, owner)


def _token_losses(rows: _TargetRows, head: Any) -> torch.Tensor:
    """Each target position's loss (float32), applying the output layer chunk by chunk when
    `rows` holds its inputs."""
    if rows.are_losses:
        return rows.values
    chunks = zip(
        torch.split(rows.values, CHUNK_ROWS), torch.split(rows.targets, CHUNK_ROWS), strict=True
    )
    return torch.cat([F.cross_entropy(head(h).float(), y, reduction="none") for h, y in chunks])


def _fusable(head: Any) -> bool:
    """A plain linear output layer that is not being trained."""
    frozen_bias = head.bias is None or not head.bias.requires_grad
    return type(head) is nn.Linear and not head.weight.requires_grad and frozen_bias


class _HeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W.T + b, y_i), with d/d hidden computed chunk by chunk in the forward
    pass: (softmax - onehot) @ W, the same product autograd would form from the logits."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            h = hidden[start : start + CHUNK_ROWS]
            y = targets[start : start + CHUNK_ROWS]
            logits = F.linear(h, weight, bias).float()
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, y[:, None]).squeeze(1)).sum()
            probs = logits.sub_(log_norm[:, None]).exp_()  # softmax, in the logits' memory
            probs[torch.arange(len(y), device=y.device), y] -= 1.0
            grad[start : start + CHUNK_ROWS] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None
