"""Adversaries: what each attack sends, who attacks, and an attacked FedAvg run."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch

from covey.config import AttackConfig, AttackKind
from covey.errors import ConfigError
from covey.fed.attacks import ATTACKS, attack_update, malicious_participants

G = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
T = {"w": torch.tensor([1.5, 2.0, 2.0, 4.5])}  # honest delta (0.5, 0, -1, 0.5)


def test_update_attacks_relative_to_the_honest_delta() -> None:
    flipped = attack_update("sign_flip", G, T, 2.0, seed=0)["w"]
    assert torch.equal(flipped, torch.tensor([0.0, 2.0, 5.0, 3.0]))
    scaled = attack_update("scale", G, T, 10.0, seed=0)["w"]
    assert torch.equal(scaled, torch.tensor([6.0, 2.0, -7.0, 9.0]))
    assert torch.equal(attack_update("free_rider", G, T, 1.0, seed=0)["w"], G["w"])
    noisy = attack_update("noise", G, T, 3.0, seed=1)["w"]
    assert torch.equal(noisy, attack_update("noise", G, T, 3.0, seed=1)["w"])
    assert not torch.equal(noisy, attack_update("noise", G, T, 3.0, seed=2)["w"])
    bf16 = attack_update("sign_flip", {"w": G["w"].bfloat16()}, {"w": T["w"].bfloat16()}, 1, 0)
    assert bf16["w"].dtype == torch.bfloat16


def test_malicious_participants_is_a_seeded_ceil_fraction() -> None:
    chosen = malicious_participants(10, AttackConfig(kind="sign_flip", malicious_fraction=0.3))
    assert len(chosen) == 3 and chosen == malicious_participants(
        10, AttackConfig(kind="sign_flip", malicious_fraction=0.3)
    )
    assert len(malicious_participants(4, AttackConfig(kind="noise", malicious_fraction=0.3))) == 2
    assert malicious_participants(10, AttackConfig(kind="none", malicious_fraction=0.3)) == set()


def test_bad_attack_settings() -> None:
    with pytest.raises(ConfigError, match=r"kind = 'poison' is not one of: none, sign_flip"):
        AttackConfig(kind="poison")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"malicious_fraction must be in \[0, 1\)"):
        AttackConfig(kind="noise", malicious_fraction=1.0)
    assert typing.get_args(AttackKind) == ATTACKS  # the recipe's choices are the attacks
    with pytest.raises(ConfigError, match="not an update attack"):
        attack_update("random_vote", G, T, 1.0, seed=0)


def test_sign_flip_attack_hurts_plain_fedavg(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path
) -> None:
    from tests.fed.test_engine import run, tiny_config

    honest = run(tiny_config(tiny_model_dir, client_data_dir, tmp_path / "honest", "fed.rounds=2"))
    attacked = run(
        tiny_config(
            tiny_model_dir,
            client_data_dir,
            tmp_path / "attacked",
            "fed.rounds=2",
            "attack.kind=sign_flip",
            "attack.malicious_fraction=0.3",
        )
    )
    flags = [c["attacker"] for c in attacked.records[-1]["clients"]]
    assert flags.count(True) == 1 and len(flags) == 3
    assert attacked.records[-1]["eval"]["loss"] > honest.records[-1]["eval"]["loss"]
