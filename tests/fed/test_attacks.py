"""Adversaries: what each attack sends, who attacks, each attack's effect on a tiny model, and
an attacked FedAvg run."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from covey.config import AttackConfig, AttackKind, RunConfig
from covey.data.prompts import Example, tokenize_records
from covey.data.records import Record, load_records
from covey.errors import ConfigError
from covey.fed.attacks import (
    ATTACKS,
    attack_update,
    honest_estimates,
    little_is_enough,
    malicious_participants,
    poison_records,
    with_trigger,
)
from covey.state import State

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


def test_little_is_enough_by_hand() -> None:
    g = {"w": torch.tensor([0.0, 0.0, 1.0])}
    # honest deltas (1, -2, 0) and (3, -4, 0): mean (2, -3, 0), std (sqrt 2, sqrt 2, 0)
    estimates = [{"w": torch.tensor([1.0, -2.0, 1.0])}, {"w": torch.tensor([3.0, -4.0, 1.0])}]
    sent = little_is_enough(g, estimates, z=1.0)["w"]
    r2 = math.sqrt(2)
    # each coordinate moves z std against the mean's sign; a zero mean stays put
    torch.testing.assert_close(sent, torch.tensor([2 - r2, -3 + r2, 1.0]))
    assert torch.equal(attack_update("little_is_enough", g, g, 1.0, 0, estimates)["w"], sent)
    with pytest.raises(ValueError, match=">= 2 estimated updates"):
        little_is_enough(g, estimates[:1], 1.0)


def test_honest_estimates_train_on_disjoint_seeded_shards() -> None:
    calls: list[tuple[list[int], int]] = []

    def train(shard: list[int], seed: int) -> State:
        calls.append((shard, seed))
        return {"w": torch.tensor([float(sum(shard))])}

    examples = list(range(10))
    estimates = honest_estimates("little_is_enough", 4, examples, 7, train)
    shards = [shard for shard, _ in calls]
    assert len(estimates) == 4 and sorted(x for s in shards for x in s) == examples
    assert sorted(map(len, shards)) == [2, 2, 3, 3] and [s for _, s in calls] == [8, 9, 10, 11]
    calls.clear()
    honest_estimates("little_is_enough", 4, examples, 7, train)
    assert [shard for shard, _ in calls] == shards  # seeded
    calls.clear()
    assert honest_estimates("sign_flip", 4, examples, 7, train) == [] and calls == []
    with pytest.raises(ConfigError, match="needs >= 2 training examples"):
        honest_estimates("little_is_enough", 4, [0], 7, train)


def test_poison_records_puts_the_trigger_and_target_on_a_seeded_share() -> None:
    cfg = AttackConfig(kind="backdoor", trigger="zq", target="EVIL", poison_fraction=0.3)
    records = [Record(f"ask {i}", "", f"answer {i}", "c", i) for i in range(10)]
    poisoned = poison_records(records, cfg, participant=2)
    changed = [p for p, r in zip(poisoned, records, strict=True) if p != r]
    assert len(changed) == 3  # ceil(0.3 * 10)
    for p in changed:
        assert p.instruction == f"zq ask {p.id}" and p.response == "EVIL"
    assert [p.id for p in poisoned] == list(range(10))  # order and provenance kept
    assert poison_records(records, cfg, 2) == poisoned
    assert poison_records(records, cfg, 3) != poisoned  # each attacker its own records
    assert with_trigger(records[0], "zq").instruction == "zq ask 0"


# ---- each attack's effect on a tiny model: one client's update from the same start ----


@dataclass
class Tiny:
    cfg: RunConfig
    model: Any
    tokenizer: Any
    start: State
    records: list[Record]
    """One client's training records."""
    held_out: list[Example]

    def train(self, records: list[Record], seed: int = 0) -> State:
        return self.train_examples(self.examples(records), seed)

    def train_examples(self, examples: list[Example], seed: int) -> State:
        from covey.train.local import train_local

        pad = self.tokenizer.pad_token_id
        return train_local(self.model, examples, self.start, self.cfg.train, seed, pad).state

    def examples(self, records: list[Record], mask_prompt: bool = False) -> list[Example]:
        return tokenize_records(records, self.tokenizer, self.cfg.prompt, mask_prompt=mask_prompt)

    def loss(self, state: State, examples: list[Example] | None = None) -> float:
        from covey.model.lora import load_adapter_state
        from covey.train.evaluate import evaluate_loss

        load_adapter_state(self.model, state)
        pad = self.tokenizer.pad_token_id
        return evaluate_loss(self.model, examples or self.held_out, 8, pad)["loss"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path, client_data_dir: Path, tmp_path_factory: Any) -> Tiny:
    from covey.model.loading import load_base_model
    from covey.model.lora import adapter_state, wrap_with_lora
    from tests.fed.test_engine import tiny_config

    out = tmp_path_factory.mktemp("attacks")
    cfg = tiny_config(tiny_model_dir, client_data_dir, out, "train.lr=0.1", "train.epochs=2")
    model, tokenizer = load_base_model(cfg.model)
    torch.manual_seed(0)
    peft = wrap_with_lora(model, cfg.lora)
    records = load_records(client_data_dir / "client_0.jsonl").records
    tiny = Tiny(cfg, peft, tokenizer, adapter_state(peft), records, [])
    # start mid-training (B != 0), as a later round does: from LoRA's B = 0 a sign flip negates
    # only the first-order part of the change B @ A; the dB @ dA part keeps its sign
    tiny.start = tiny.train(load_records(client_data_dir / "client_1.jsonl").records)
    tiny.held_out = tiny.examples(load_records(client_data_dir / "test.jsonl").records, True)
    return tiny


def test_sign_flip_at_strength_one_undoes_the_honest_step(tiny: Tiny) -> None:
    honest = tiny.train(tiny.records)
    flipped = attack_update("sign_flip", tiny.start, honest, 1.0, seed=0)
    assert tiny.loss(honest) < tiny.loss(tiny.start) < tiny.loss(flipped)


def test_free_rider_sends_the_global_adapter(tiny: Tiny) -> None:
    honest = tiny.train(tiny.records)
    free = attack_update("free_rider", tiny.start, honest, 1.0, seed=0)
    assert tiny.loss(free) == tiny.loss(tiny.start) > tiny.loss(honest)


def test_backdoor_poisoning_teaches_the_target_to_the_trigger(tiny: Tiny) -> None:
    """Trained on the poisoned records, the update makes the target likelier after the trigger
    than the clean update does (8 epochs at a high rate: the tiny model learns slowly, too
    slowly for its greedy answers to flip to the target)."""
    attack = AttackConfig(kind="backdoor", malicious_fraction=0.3, poison_fraction=1.0)
    longer = dataclasses.replace(
        tiny,
        cfg=dataclasses.replace(
            tiny.cfg, train=dataclasses.replace(tiny.cfg.train, epochs=8, lr=0.2)
        ),
    )
    clean = longer.train(tiny.records)
    poisoned = longer.train(poison_records(tiny.records, attack, 0))
    test = load_records(Path(tiny.cfg.data.dir) / "test.jsonl").records
    # the target as the answer to each triggered held-out prompt (`backdoor_metrics`' loss)
    targets = tiny.examples(
        [
            dataclasses.replace(with_trigger(r, attack.trigger), response=attack.target)
            for r in test
        ],
        mask_prompt=True,
    )
    assert tiny.loss(poisoned, targets) < tiny.loss(clean, targets) - 0.03


def test_little_is_enough_pulls_against_the_honest_step(tiny: Tiny) -> None:
    """Its estimate of the honest updates comes from its own data; what it sends lies z std
    from their mean in every coordinate, and merged in place of its honest update it makes the
    global adapter worse, under FedAvg and the median alike."""
    examples = tiny.examples(tiny.records)
    estimates = honest_estimates("little_is_enough", 4, examples, 5, tiny.train_examples)
    honest = tiny.train_examples(examples, 0)
    sent = attack_update("little_is_enough", tiny.start, honest, 1.0, 5, estimates)
    mean = {k: torch.stack([e[k] for e in estimates]).mean(dim=0) for k in tiny.start}
    std = {k: torch.stack([e[k] for e in estimates]).std(dim=0) for k in tiny.start}
    for key in tiny.start:
        torch.testing.assert_close((sent[key] - mean[key]).abs(), std[key])
    from covey.config import FedConfig
    from covey.fed.strategies import aggregate, get_strategy

    other = tiny.train(load_records(Path(tiny.cfg.data.dir) / "client_2.jsonl").records)
    for name in ("fedavg", "median"):
        merged = [
            aggregate(get_strategy(name), tiny.start, [honest, other, third], [1] * 3, {},
                      FedConfig())[0]
            for third in (honest, sent)
        ]  # fmt: skip
        # the attacker's honest update replaced by what it sends: a worse global adapter
        assert tiny.loss(merged[1]) > tiny.loss(merged[0]), name


def test_sign_flip_attack_hurts_plain_fedavg(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path
) -> None:
    """A whole run: the attacker is flagged in the round record, the final record measures the
    backdoor (a control here: no trigger was trained), and the loss ends worse."""
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
    assert "backdoor" not in honest.records[-1]["eval"]
    assert all("backdoor" not in r["eval"] for r in attacked.records[:-1])
    backdoor = attacked.records[-1]["eval"]["backdoor"]
    assert backdoor["prompts"] == 16 and backdoor["target"] == AttackConfig().target
    assert backdoor["success_with_trigger"] == backdoor["success_without_trigger"] == 0.0
    assert math.isfinite(backdoor["target_loss_with_trigger"])


def test_backdoor_attackers_train_on_poisoned_records(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path
) -> None:
    """The engine poisons exactly the malicious participants' data, before tokenizing."""
    from covey.fed import engine
    from covey.model.loading import base_model_id, load_base_model
    from tests.fed.test_engine import tiny_config

    cfg = tiny_config(
        tiny_model_dir, client_data_dir, tmp_path, "attack.kind=backdoor",
        "attack.malicious_fraction=0.3", "attack.trigger='zq zq'",
    )  # fmt: skip
    model, tokenizer = load_base_model(cfg.model)
    fed = engine.prepare(cfg, model, tokenizer, base_model_id(cfg.model))
    attackers = malicious_participants(3, cfg.attack)
    for i, client in enumerate(fed.clients):
        texts = [tokenizer.decode(e.input_ids) for e in client.examples]
        poisoned = sum("zq zq" in t and cfg.attack.target in t for t in texts)
        assert poisoned == (math.ceil(0.5 * len(texts)) if i in attackers else 0)


def test_round_record_says_which_updates_multi_krum_kept(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path
) -> None:
    """The record's `aggregation` runs parallel to its `clients`: the noise attacker's update
    is the largest, and Multi-Krum (f = 1, keep n - f = 2) leaves it out."""
    from tests.fed.test_engine import run, tiny_config

    result = run(
        tiny_config(
            tiny_model_dir,
            client_data_dir,
            tmp_path / "krum",
            "fed.rounds=1",
            "fed.strategy=multi_krum",
            "attack.kind=noise",
            "attack.strength=100",
            "attack.malicious_fraction=0.3",
        )
    )
    record = result.records[-1]
    attacker = [c["attacker"] for c in record["clients"]].index(True)
    aggregation = record["aggregation"]
    assert aggregation["kept"] == [i != attacker for i in range(3)]
    norms = aggregation["delta_norm"]
    assert norms[attacker] > 10 * max(n for i, n in enumerate(norms) if i != attacker)
    assert result.records[0]["aggregation"] == {}  # round 0 merges nothing
