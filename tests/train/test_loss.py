"""The fast loss paths compute the full computation's loss and gradients.

Target-only output layer (`covey.train.loss`) and packing (`covey.train.packing`) against the
stock computation (padded rows, logits and cross-entropy at every position), on the tiny Llama
and on random models with SmolLM2-135M's and Qwen2's layer shapes and vocabularies.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from covey.config import LoraSettings
from covey.data.prompts import IGNORE_INDEX, Example
from covey.model.lora import wrap_with_lora
from covey.train import loss as loss_module
from covey.train.loss import example_loss_sums, splits_output_layer, summed_loss
from covey.train.packing import make_batch, pack_batch, pad_batch
from tests.model.tiny import tiny_config

PAD = 0
CPU = torch.device("cpu")


def smollm2_shaped() -> LlamaConfig:
    """SmolLM2-135M's config.json with 2 of its 30 layers."""
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    )


def qwen2_shaped() -> Qwen2Config:
    """Qwen2's layout (biases on q/k/v, untied output layer), small."""
    return Qwen2Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )


MODELS = {
    "tiny-llama": lambda: LlamaForCausalLM(tiny_config()),
    "smollm2-shaped": lambda: LlamaForCausalLM(smollm2_shaped()),
    "qwen2-shaped": lambda: Qwen2ForCausalLM(qwen2_shaped()),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def peft_model(request: pytest.FixtureRequest) -> Any:
    torch.manual_seed(0)
    model = MODELS[request.param]().eval()
    peft = wrap_with_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    # LoRA B starts at zero; give it values so its gradient paths are exercised too
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return peft


def examples_for(model: Any, seed: int = 0) -> list[Example]:
    """Examples of different lengths with masked prompts, one without any target."""
    vocab = model.get_base_model().config.vocab_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for length, prompt in [(23, 9), (7, 3), (16, 16), (31, 4), (12, 0)]:
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def loss_and_grads(
    model: Any, examples: list[Example], packed: bool, targets_only: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    batch = make_batch(examples, PAD, CPU, packed)
    loss = summed_loss(model, batch, targets_only)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize(("packed", "targets_only"), [(False, True), (True, False), (True, True)])
def test_fast_paths_give_the_full_loss_and_gradients(
    peft_model: Any, packed: bool, targets_only: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    examples = examples_for(peft_model)
    want_loss, want_grads = loss_and_grads(peft_model, examples, False, False)
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", 8)  # several output-layer chunks
    got_loss, got_grads = loss_and_grads(peft_model, examples, packed, targets_only)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert want_grads.keys() == got_grads.keys() and want_grads  # the LoRA A and B matrices
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-4, atol=1e-6, msg=name)


def test_full_loss_is_the_mean_cross_entropy_of_the_model_itself(peft_model: Any) -> None:
    """The reference path is what transformers computes with `labels` (mean over targets)."""
    examples = examples_for(peft_model)
    batch = pad_batch(examples, PAD, CPU)
    labels = torch.full_like(batch.input_ids, IGNORE_INDEX)
    for row, e in enumerate(examples):
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
    with torch.no_grad():
        stock = peft_model(**batch.model_inputs(), labels=labels).loss
        ours = summed_loss(peft_model, batch, targets_only=False)
    targets = sum(e.num_target_tokens for e in examples)
    torch.testing.assert_close(ours / targets, stock, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
def test_example_loss_sums_match_each_example_alone(peft_model: Any, packed: bool) -> None:
    examples = examples_for(peft_model, seed=1)
    sums, counts = example_loss_sums(peft_model, make_batch(examples, PAD, CPU, packed), 5)
    assert counts.tolist() == [float(e.num_target_tokens) for e in examples]
    assert counts[-1] == 11 and counts[2] == 0  # no prompt; all prompt
    for i, e in enumerate(examples):
        alone, _ = example_loss_sums(peft_model, pad_batch([e], PAD, CPU), 1, targets_only=False)
        torch.testing.assert_close(sums[i], alone[0], rtol=1e-5, atol=1e-5)


def test_other_architectures_use_their_own_logits(
    peft_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model type outside SPLIT_ARCHITECTURES gets the full forward, and the same loss."""
    examples = examples_for(peft_model)
    split, _ = loss_and_grads(peft_model, examples, True, True)
    monkeypatch.setattr(loss_module, "SPLIT_ARCHITECTURES", frozenset())
    assert not splits_output_layer(peft_model)
    whole, _ = loss_and_grads(peft_model, examples, True, True)
    torch.testing.assert_close(whole, split, rtol=1e-5, atol=1e-5)


def test_packed_layout() -> None:
    a = Example(input_ids=[5, 6, 7], labels=[IGNORE_INDEX, 6, 7])
    b = Example(input_ids=[8, 9], labels=[8, 9])
    packed = pack_batch([a, b], CPU)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert packed.position_ids is not None and packed.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # a's last token predicts nothing: no target crosses into b
    assert packed.targets.tolist() == [[6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert packed.example_index.tolist() == [[0, 0, 0, 1, 1]]
    assert packed.attention_mask is None and packed.tokens == 5
    padded = pad_batch([a, b], PAD, CPU)
    assert padded.input_ids.tolist() == [[5, 6, 7], [8, 9, PAD]]
    assert padded.targets.tolist() == [[6, 7, IGNORE_INDEX], [9, IGNORE_INDEX, IGNORE_INDEX]]
    assert padded.example_index.tolist() == [[0, 0, 0], [1, 1, -1]]
    assert padded.tokens == 5
