"""Tiny causal LMs built offline, for tests that need a real model but not a real download.

`make_tiny_model_dir` writes a random 2-layer Llama plus a byte-level BPE tokenizer (any text
tokenizes, about one token per byte) with a ChatML chat template, like SmolLM2's. `make_tiny_gguf`
writes the same kind of model as a GGUF file, so the GGUF path runs in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Same special tokens (and ids) as SmolLM2, so chat-template code paths match the demo model.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD, BOS, EOS = SPECIALS
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 32, 2, 4, 2, 64


# A few merges, so both tokenizers are real BPE (GGUF's loader needs at least one merge).
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]


def byte_vocab() -> list[str]:
    """The special tokens, the 256 byte-level characters, then the merged tokens: 262 in all."""
    return SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in MERGES]


def make_tiny_tokenizer(pad_token: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer; without `pad_token` it has eos and bos only."""
    vocab = {token: i for i, token in enumerate(byte_vocab())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD if pad_token else None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(pad_token: bool = True) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(byte_vocab()),
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=SPECIALS.index(BOS),
        eos_token_id=SPECIALS.index(EOS),
        pad_token_id=SPECIALS.index(PAD) if pad_token else None,
    )


def make_tiny_model_dir(path: Path, *, pad_token: bool = True, seed: int = 0) -> Path:
    """Save a random tiny Llama (float32 safetensors) and its tokenizer to `path`; return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(pad_token))
    model.save_pretrained(path)
    make_tiny_tokenizer(pad_token).save_pretrained(path)
    return path


def make_tiny_gguf(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny Llama GGUF to `path` (a file name ending in .gguf); return it.

    The large matrices are stored as Q8_0 so loading exercises dequantization; the norms and
    the embedding stay float32. The tokenizer is the same byte-level vocabulary as above.
    """
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    vocab = byte_vocab()

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("covey-tiny-llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    control, normal = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL
    writer.add_token_types([control if t in SPECIALS else normal for t in vocab])
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    writer.add_bos_token_id(SPECIALS.index(BOS))
    writer.add_eos_token_id(SPECIALS.index(EOS))
    writer.add_pad_token_id(SPECIALS.index(EOS))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def dense(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)

    def q8(name: str, data: np.ndarray) -> None:
        q8_0 = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, q8_0), raw_dtype=q8_0)

    writer.add_tensor("token_embd.weight", dense(len(vocab), HIDDEN))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    kv = KV_HEADS * head_dim
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        q8(f"blk.{i}.attn_q.weight", dense(HIDDEN, HIDDEN))
        q8(f"blk.{i}.attn_k.weight", dense(kv, HIDDEN))
        q8(f"blk.{i}.attn_v.weight", dense(kv, HIDDEN))
        q8(f"blk.{i}.attn_output.weight", dense(HIDDEN, HIDDEN))
        q8(f"blk.{i}.ffn_gate.weight", dense(INTERMEDIATE, HIDDEN))
        q8(f"blk.{i}.ffn_up.weight", dense(INTERMEDIATE, HIDDEN))
        q8(f"blk.{i}.ffn_down.weight", dense(HIDDEN, INTERMEDIATE))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
