"""The one type that crosses every boundary: an adapter as a plain dict of tensors, and the
arithmetic every layer does on it (the difference of two adapters, its size, one flat vector).

Keys are PEFT's (`get_peft_model_state_dict`, no adapter name), e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Server optimizer buffers use
the same type (`ServerState`), keyed `<buffer>.<adapter key>`.

The helpers live here, below everything that uses them (aggregation, update validation, the
voters' scoring and copy checks, attacks, transport), so that a delta, a norm or a flattening
is computed one way everywhere: the same keys in the same order, the same precision.
"""

import math

import torch

State = dict[str, torch.Tensor]
ServerState = dict[str, torch.Tensor]


def delta(
    state: State,
    base: State,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> State:
    """`state - base`, key by key over `base`'s keys (in its order), computed in `dtype` on
    `device` (default: each `base` tensor's own device). Both sides are cast before the
    subtraction, so a bf16 adapter's delta is not rounded to bf16. A key of `base` missing
    from `state` raises KeyError: callers check layouts first (`covey.fed.validation`)."""
    return {
        key: state[key].detach().to(device=device or b.device, dtype=dtype)
        - b.detach().to(device=device or b.device, dtype=dtype)
        for key, b in base.items()
    }


def flatten(state: State) -> torch.Tensor:
    """Every tensor of `state` as one vector, keys in sorted order (so two states with the same
    keys line up entry by entry whatever order their dicts were built in), in their dtype; an
    empty state is an empty float32 vector."""
    if not state:
        return torch.zeros(0)
    return torch.cat([state[key].flatten() for key in sorted(state)])


def norm(state: State) -> float:
    """The L2 norm of `state` over all its tensors, as if flattened into one vector: each
    tensor's squares summed in float64, the sum of those in Python, in `state`'s key order."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in state.values()))
