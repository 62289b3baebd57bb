"""The one type that crosses every boundary: an adapter as a plain dict of tensors.

Keys are PEFT's (`get_peft_model_state_dict`, no adapter name), e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Server optimizer buffers use
the same type (`ServerState`), keyed `<buffer>.<adapter key>`.
"""

import torch

State = dict[str, torch.Tensor]
ServerState = dict[str, torch.Tensor]
