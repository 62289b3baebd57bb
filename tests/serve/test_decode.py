"""The CPU decoding path: the transposed output projection computes the same map."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from covey.serve.decode import (
    TransposedLinear,
    decoding_threads,
    transpose_output_projection,
)
from covey.serve.generate import ServeSession


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_transposed_linear_is_the_same_map(bias: bool, rows: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 300, bias=bias)
    hidden = torch.randn(rows, 3, 48)
    torch.testing.assert_close(TransposedLinear(linear)(hidden), linear(hidden))


def test_the_copy_is_not_a_trainable_or_saved_weight() -> None:
    head = TransposedLinear(nn.Linear(8, 16, bias=False))
    assert list(head.parameters()) == []
    assert head.state_dict() == {}


def test_serving_sessions_decode_with_it(session: ServeSession) -> None:
    """load_session swaps it in on a CPU (tests/serve/test_generate.py checks that every pane
    still answers exactly as plain transformers and PEFT do)."""
    head = session.model.get_base_model().get_output_embeddings()
    assert isinstance(head, TransposedLinear)
    embedding = session.model.get_base_model().get_input_embeddings()
    assert head.weight_t.shape == embedding.weight.shape[::-1]


def test_only_a_plain_cpu_linear_is_replaced() -> None:
    class Model(nn.Module):
        def __init__(self, head: nn.Module) -> None:
            super().__init__()
            self.head = head

        def get_output_embeddings(self) -> nn.Module:
            return self.head

        def set_output_embeddings(self, head: nn.Module) -> None:
            self.head = head

    class Subclass(nn.Linear):
        pass

    assert not transpose_output_projection(Model(Subclass(4, 8)))
    assert not transpose_output_projection(Model(nn.Identity()))
    model = Model(nn.Linear(4, 8))
    assert transpose_output_projection(model)
    assert isinstance(model.head, TransposedLinear)


def test_decoding_threads_apply_on_the_cpu_only_and_are_restored() -> None:
    before = torch.get_num_threads()
    with decoding_threads(1, torch.device("cpu")) as count:
        assert count == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with decoding_threads(0, torch.device("cpu")) as count:  # torch's own choice, untouched
        assert count == torch.get_num_threads() == before
    with decoding_threads(1, torch.device("cuda")) as count:  # no CUDA needed: nothing changes
        assert count == torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_decoding_threads_are_restored_when_the_block_fails() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), decoding_threads(1, torch.device("cpu")):
        raise RuntimeError("stop")
    assert torch.get_num_threads() == before
