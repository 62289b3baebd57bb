"""What an honest FLock voter checks before it judges an update: the blob is this task's and
this round's, its size is within what the task's training can make, and it is no copy of what
another proposer published in an earlier round (issue 26)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pytest
import torch
from eth_utils.address import to_checksum_address

from covey.config import RunConfig, load_recipe
from covey.data.split import SplitConfig, run_split
from covey.errors import ConfigError, DataError
from covey.fed import engine
from covey.fed.attacks import attack_update
from covey.fed.transport import Codec
from covey.fed.validation import adam_step_bound, training_norm_bound, validate_update
from covey.flock.agent import FINISHED, Participant, data_split
from covey.flock.commitments import proposal_commitment
from covey.flock.copies import (
    Earlier,
    RoundSketches,
    SketchBook,
    Sketcher,
    cosine,
    find_copy,
    function_space,
    similarity,
)
from covey.flock.ledger import Blobs, Ledger, global_bytes, read_update, update_bytes
from covey.flock.protocol import setup
from covey.flock.task import Outcome, Phase
from covey.model.loading import base_model_id, load_base_model
from covey.model.lora import adapter_state
from covey.state import State
from covey.store.cid import cid_from_digest, digest_of
from covey.store.local import LocalStore
from covey.store.updates import serialize_update
from covey.train.local import train_local
from tests.conftest import dolly_records, write_records
from tests.flock import World, join_all, seed_and_draw, vote
from tests.flock import start as start_task

TASK = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
OTHER_TASK = "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512"
A, B, C = "0x" + "a" * 40, "0x" + "b" * 40, "0x" + "c" * 40  # proposers: author, other, copier


# ---------------------------------------------------------------- binding to task and round


def test_a_blob_made_for_another_round_or_task_is_refused() -> None:
    reference = {"w": torch.zeros(2, 3)}
    update = {"w": torch.ones(2, 3)}
    blob = update_bytes(update, reference, "bafkreiglobal", Codec(), task=TASK, round_=1)
    # the address's case does not matter (checksummed or not); the round and the task do
    for task in (TASK, TASK.lower()):
        read = read_update(blob, reference, "bafkreiglobal", Codec(), task=task, round_=1)
        assert torch.equal(read["w"], update["w"])
    with pytest.raises(DataError, match="made for round 1, not round 2"):
        read_update(blob, reference, "bafkreiglobal", Codec(), task=TASK, round_=2)
    with pytest.raises(DataError, match=f"made for task {TASK.lower()}, not this task"):
        read_update(blob, reference, "bafkreiglobal", Codec(), task=OTHER_TASK, round_=1)
    # a blob of the format before /3 names neither: refused for its format
    old = serialize_update(
        update,
        {"format": "covey-flock-update/2", "transport": "fp32", "reference": "bafkreiglobal"},
    )
    with pytest.raises(DataError, match="format 'covey-flock-update/2'"):
        read_update(old, reference, "bafkreiglobal", Codec(), task=TASK, round_=1)
    # the same tensors made for another round are other bytes: another CID, another digest
    assert blob != update_bytes(update, reference, "bafkreiglobal", Codec(), task=TASK, round_=2)


# ---------------------------------------------------------------- the tiny model's updates


@dataclass
class Updates:
    """Honest updates of the tests' tiny Llama, trained as FLock proposers train them."""

    cfg: RunConfig
    g0: State
    """The round-0 global adapter."""
    a0: State
    """Participant A's round-0 update."""
    b0: State
    """Participant B's round-0 update."""
    a0_again: State
    """A trained again from g0 with another seed (a round that accepted nothing)."""
    b0_again: State
    """B likewise."""
    g1: State
    """The global adapter after round 0 accepted A's and B's updates (their mean)."""
    b1: State
    """B's round-1 update, from g1."""


def flock_recipe(tiny_model_dir: Path, data: Path, *sets: str) -> RunConfig:
    return load_recipe(
        None,
        [
            f"model.base='{tiny_model_dir}'", f"data.dir='{data}'", "lora.r=4", "lora.alpha=8",
            "lora.dropout=0.0", "prompt.template=chat", "prompt.cutoff_len=128",
            "train.epochs=2", "train.batch_size=8", "train.micro_batch_size=8",
            "train.lr=3e-2", "train.max_steps=4", "fed.consensus=flock",
            "flock.validation_examples=4",
            # the random tiny model's honest updates on these IID fixture records are nearly
            # parallel (up to 0.95: benchmarks/results/voter_checks_tiny.json)
            "flock.copy_cosine=0.99", *sets,
        ],
    )  # fmt: skip


@pytest.fixture(scope="module")
def updates(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Updates:
    root = tmp_path_factory.mktemp("voter-checks")
    source = write_records(root / "source.jsonl", dolly_records(per_category=12))
    run_split(SplitConfig(input=str(source), out=root / "split", clients=5, min_size=8,
                          scheme="iid", test_per_category=2))  # fmt: skip
    cfg = flock_recipe(tiny_model_dir, root / "split")
    model, tokenizer = load_base_model(cfg.model)
    fed = engine.prepare(cfg, model, tokenizer, base_model_id(cfg.model))
    run = fed.run_model
    trains = [data_split(c.examples, cfg.flock.validation_examples)[0] for c in fed.clients]

    def train(i: int, start: State, seed: int) -> State:
        return train_local(run.model, trains[i], start, cfg.train, seed, run.pad_id).state

    g0 = adapter_state(run.model)
    a0, b0 = train(0, g0, 1), train(1, g0, 2)
    g1 = {k: g0[k] + ((a0[k] - g0[k]) + (b0[k] - g0[k])) / 2 for k in g0}
    return Updates(
        cfg=cfg, g0=g0, a0=a0, b0=b0, a0_again=train(0, g0, 11), b0_again=train(1, g0, 12),
        g1=g1, b1=train(1, g1, 3),
    )  # fmt: skip


# ---------------------------------------------------------------- the norm bound


def test_flock_recipes_must_cap_the_steps_that_bound_an_update(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.max_steps = 0 cannot combine with "
                       r"fed\.consensus = 'flock'.*set train\.max_steps"):  # fmt: skip
        load_recipe(None, ["fed.consensus=flock"])
    assert load_recipe(None, ["fed.consensus=flock", "train.max_steps=8"]).train.max_steps == 8
    # an explicit bound needs no cap; the server engine needs neither
    load_recipe(None, ["fed.consensus=flock", "fed.max_update_norm=3"])
    load_recipe(None, [])
    with pytest.raises(ValueError, match=r"train\.max_steps is 0"):
        training_norm_bound(RunConfig().train, {"w": torch.zeros(2)})


def test_adams_largest_step_is_the_cauchy_schwarz_bound() -> None:
    """adam_step_bound against torch's AdamW itself: the gradients that reach the bound (each
    step's b2/b1 times the last) move the parameter by exactly lr * bound at every step, and
    random gradients never more."""
    lr, steps = 0.1, 60
    b1, b2 = 0.9, 0.999
    growing = [(b2 / b1) ** t for t in range(steps)]
    for gradients in (growing, torch.randn(steps, generator=torch.Generator().manual_seed(0))):
        p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.AdamW([p], lr=lr, weight_decay=0.0)
        for t, g in enumerate(gradients, start=1):
            before = float(p.detach())
            p.grad = torch.tensor([float(g)], dtype=torch.float64)
            optimizer.step()
            moved = abs(float(p.detach()) - before) / lr
            assert moved <= adam_step_bound(t) * (1 + 1e-9)
            if gradients is growing:
                assert moved == pytest.approx(adam_step_bound(t), rel=1e-6)
    assert adam_step_bound(1) == 1.0
    assert adam_step_bound(100_000) == pytest.approx(7.2703, abs=1e-4)  # not 3.16


def test_honest_updates_sit_below_the_bound_and_attacks_far_above(updates: Updates) -> None:
    cfg = updates.cfg
    bound = training_norm_bound(cfg.train, updates.g0, cfg.fed.transport)
    honest = [
        validate_update(s, g, 1, 1, bound)
        for s, g in ((updates.a0, updates.g0), (updates.b0, updates.g0),
                     (updates.a0_again, updates.g0), (updates.b1, updates.g1))
    ]  # fmt: skip
    assert all(v.accepted for v in honest)
    ratios = [v.update_norm / bound for v in honest]
    assert max(ratios) < 0.8, ratios  # measured 0.46-0.59 (benchmarks/bench_voter_checks.py)
    noise = attack_update("noise", updates.g0, updates.a0, 100.0, seed=7)  # the x100 attack
    huge = {k: torch.full_like(v, 1e30) for k, v in updates.g0.items()}
    for attack in (noise, huge):
        verdict = validate_update(attack, updates.g0, 1, 1, bound, "the task's training bound")
        assert not verdict.accepted
        assert verdict.reason.startswith("update norm ") and "exceeds the bound" in verdict.reason
        assert "the task's training bound" in verdict.reason
    # before FLock had a default bound (fed.max_update_norm = 0), both passed validation
    assert validate_update(huge, updates.g0, 1, 1, cfg.fed.max_update_norm).accepted


@pytest.mark.parametrize("transport", ["fp16", "bf16", "int8", "int8+topk"])
def test_the_bound_covers_what_each_transport_adds(updates: Updates, transport: str) -> None:
    fp32 = training_norm_bound(updates.cfg.train, updates.g0, "fp32")
    bound = training_norm_bound(updates.cfg.train, updates.g0, transport, 0.1)
    assert fp32 < bound < 25 * fp32
    codec = Codec(transport, 0.1)  # type: ignore[arg-type]
    blob = update_bytes(updates.a0, updates.g0, "bafkrei0", codec, task=TASK, round_=0)
    arrived = read_update(blob, updates.g0, "bafkrei0", codec, task=TASK, round_=0)
    assert validate_update(arrived, updates.g0, 1, 1, bound).accepted


def test_weight_decay_widens_the_bound_by_what_it_can_pull() -> None:
    reference = {"w": torch.full((10, 10), 2.0)}  # norm 20
    plain = load_recipe(None, ["train.max_steps=3", "train.lr=0.01"]).train
    decayed = replace(plain, weight_decay=0.1)
    adam = math.sqrt(100) * 0.01 * sum(adam_step_bound(t) for t in (1, 2, 3))
    assert training_norm_bound(plain, reference) == pytest.approx(1.01 * adam)
    expected = 1.01 * (adam + 3 * 0.01 * 0.1 * (20 + adam))
    assert training_norm_bound(decayed, reference) == pytest.approx(expected)


# ---------------------------------------------------------------- copies


def sketch_of(sketcher: Sketcher, update: State, reference: State) -> torch.Tensor:
    return sketcher.sketch(update, reference)


def copies(u: Updates) -> dict[str, State]:
    """What a copier can propose in round 1 from A's round-0 update."""
    delta = {k: u.a0[k] - u.g0[k] for k in u.g0}
    generator = torch.Generator().manual_seed(5)
    scale = 0.1 * float(torch.cat([d.flatten() for d in delta.values()]).norm())
    noise = {k: torch.randn(v.shape, generator=generator) for k, v in delta.items()}
    noise_norm = float(torch.cat([n.flatten() for n in noise.values()]).norm())
    reparametrized = dict(u.a0)
    for a_key in [k for k in reparametrized if ".lora_A." in k]:
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        rank = reparametrized[a_key].shape[0]
        m = torch.eye(rank, dtype=torch.float64) + 0.5 * torch.randn(
            rank, rank, generator=generator, dtype=torch.float64
        )
        reparametrized[b_key] = (reparametrized[b_key].double() @ m).float()
        reparametrized[a_key] = torch.linalg.solve(m, reparametrized[a_key].double()).float()
    return {
        # round 0 accepted nothing: the same global adapter, A's tensors wrapped again
        "rewrapped": dict(u.a0),
        # A's delta added to the newer global adapter
        "delta_on_new_global": {k: u.g1[k] + delta[k] for k in u.g1},
        # ... with Gaussian noise of a tenth of its norm
        "perturbed": {k: u.g1[k] + delta[k] + scale / noise_norm * noise[k] for k in u.g1},
        # round 0 accepted nothing: A's adapter re-parametrized, (B M, M^-1 A) in every LoRA
        # module, computes the same function with other matrices
        "reparametrized": reparametrized,
    }


@pytest.mark.parametrize("kind", ["rewrapped", "delta_on_new_global", "perturbed",
                                  "reparametrized"])  # fmt: skip
def test_a_copy_of_an_earlier_proposal_is_found(updates: Updates, kind: str) -> None:
    sketcher = Sketcher(b"voter secret")
    threshold = updates.cfg.flock.copy_cosine
    earlier = [
        Earlier(0, A, sketch_of(sketcher, updates.a0, updates.g0)),
        Earlier(0, B, sketch_of(sketcher, updates.b0, updates.g0)),
    ]
    proposal = copies(updates)[kind]
    start = updates.g0 if kind in ("rewrapped", "reparametrized") else updates.g1
    found = find_copy(sketch_of(sketcher, proposal, start), C, earlier, threshold)
    assert found is not None and (found.round, found.author) == (0, A)
    assert found.cosine >= threshold
    assert found.reason().startswith(
        f"a copy of {to_checksum_address(A)}'s proposal of round 0 (delta cosine"
    )
    # the author proposing its own update again is not a copy of anyone's
    assert find_copy(sketch_of(sketcher, proposal, start), A, earlier, threshold) is None


def test_honest_updates_are_not_copies(updates: Updates) -> None:
    """Neither a participant training again from the same global adapter (a round that
    accepted nothing), against its own and another's earlier update, nor the next round's
    update of another participant."""
    sketcher = Sketcher(b"voter secret")
    threshold = updates.cfg.flock.copy_cosine
    earlier = [
        Earlier(0, A, sketch_of(sketcher, updates.a0, updates.g0)),
        Earlier(0, B, sketch_of(sketcher, updates.b0, updates.g0)),
    ]
    for proposer, update, start in (
        (A, updates.a0_again, updates.g0),
        (B, updates.b0_again, updates.g0),
        (B, updates.b1, updates.g1),
    ):
        sketch = sketch_of(sketcher, update, start)
        assert find_copy(sketch, proposer, earlier, threshold) is None
        others = [e for e in earlier if e.proposer != proposer]
        assert max(similarity(sketch, e.sketch) for e in others) < threshold


def test_a_copy_of_an_authors_update_does_not_make_the_authors_next_one_a_copy(
    updates: Updates,
) -> None:
    """A in round 0; a copier's re-wrap in round 1 (refused); A's retrain in round 2, which
    repeats much of its round-0 update, and so of the copy: still A's own work."""
    sketcher = Sketcher(b"voter secret")
    earlier = [
        Earlier(0, A, sketch_of(sketcher, updates.a0, updates.g0)),
        Earlier(1, C, sketch_of(sketcher, copies(updates)["rewrapped"], updates.g0)),
    ]
    retrain = sketch_of(sketcher, updates.a0_again, updates.g0)
    # a threshold so low that the retrain matches both: the earliest match is A's own
    assert similarity(retrain, earlier[1].sketch) > 0.5
    assert find_copy(retrain, A, earlier, 0.5) is None
    copied = find_copy(retrain, B, earlier, 0.5)  # anyone else proposing it copies A, not C
    assert copied is not None and copied.author == A


def test_the_sketch_keeps_cosines_of_large_adapters_and_is_keyed() -> None:
    """On an adapter larger than the sketch (24 LoRA modules of 256 x 8 and 8 x 256): cosines
    in both spaces within 0.05 of the exact ones; another key gives other buckets; a
    re-parametrized module leaves the function-space row as it was."""
    g = torch.Generator().manual_seed(0)
    keys = [f"layers.{i}.proj.lora_{ab}.weight" for i in range(24) for ab in "AB"]

    def adapter(scale: float = 1.0, base: State | None = None) -> State:
        out = {}
        for k in keys:
            shape = (8, 256) if ".lora_A." in k else (256, 8)
            out[k] = (base[k] if base else 0) + scale * torch.randn(*shape, generator=g)
        return out

    reference = adapter()
    x = adapter(0.1, reference)
    mix = {k: reference[k] + 0.6 * (x[k] - reference[k]) + 0.8 * (adapter(0.1)[k]) for k in keys}
    sketcher = Sketcher(b"key one", size=4096, side=16)
    sx, smix = sketcher.sketch(x, reference), sketcher.sketch(mix, reference)
    assert sx.shape == (2, 4096)
    params = cosine(
        torch.cat([(x[k] - reference[k]).flatten() for k in sorted(keys)]),
        torch.cat([(mix[k] - reference[k]).flatten() for k in sorted(keys)]),
    )
    function = cosine(function_space(x, reference), function_space(mix, reference))
    assert abs(cosine(sx[0], smix[0]) - params) < 0.05
    assert abs(cosine(sx[1], smix[1]) - function) < 0.05
    other = Sketcher(b"key two", size=4096, side=16).sketch(x, reference)
    assert abs(cosine(other[0], sx[0])) < 0.1  # another voter's buckets: unrelated
    m = torch.eye(8) + 0.5 * torch.randn(8, 8, generator=g)
    moved = dict(x)
    moved[keys[0]] = torch.linalg.solve(m, x[keys[0]])
    moved[keys[1]] = x[keys[1]] @ m
    again = sketcher.sketch(moved, reference)
    assert cosine(again[1], sx[1]) > 0.999 and cosine(again[0], sx[0]) < 0.999


def test_sketches_are_kept_per_round_and_remade_when_unreadable(tmp_path: Path) -> None:
    sketcher = Sketcher(b"k", size=8)
    book = SketchBook(tmp_path, sketcher)
    assert book.load(0) is None
    known = RoundSketches()
    known.add(A.upper().replace("0X", "0x"), torch.arange(16.0).reshape(2, 8))
    known.add(B, None)
    book.save(0, known)
    loaded = book.load(0)
    assert loaded is not None and loaded.known() == {A, B}
    assert torch.equal(loaded.sketches[A], torch.arange(16.0, dtype=torch.float64).reshape(2, 8))
    assert SketchBook(tmp_path, Sketcher(b"another key", size=8)).load(0) is None
    book.path(0).write_bytes(b"garbage")
    assert book.load(0) is None


# ---------------------------------------------------------------- end to end, on chain


class Copier(Participant):
    """Proposes, from round 1 on, the delta of another proposer's accepted update of an earlier
    round, added to the round's global adapter with noise of a twentieth of its norm, wrapped
    as its own proposal of this round (new metadata, new CID); trains honestly before that."""

    def _train(
        self, round_: int, global_state: State, global_cid: str
    ) -> tuple[bytes, dict[str, float]]:
        for r in reversed(range(round_)):
            theirs = [(p, c) for p, c in self.ledger.accepted_updates(r) if p != self.address]
            if theirs:
                break
        else:
            return super()._train(round_, global_state, global_cid)
        author, cid = theirs[0]
        their_global, their_cid = self.ledger.global_state(r)
        update = read_update(
            self.blobs.get(cid, author), their_global, their_cid, self.ledger.codec,
            task=self.task.address, round_=r,
        )  # fmt: skip
        generator = torch.Generator().manual_seed(round_)
        copy = {}
        for k, g in global_state.items():
            delta = update[k] - their_global[k]
            noise = torch.randn(delta.shape, generator=generator)
            copy[k] = g + delta + noise * (0.05 * float(delta.norm()) / float(noise.norm()))
        self.state.round(round_)["copied"] = {"round": r, "author": author}
        data = update_bytes(
            copy, global_state, global_cid, self.ledger.codec, task=self.task.address,
            round_=round_,
        )  # fmt: skip
        return data, {}


@pytest.mark.chain
def test_voters_refuse_copies_and_oversized_updates_in_a_flock_run(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The simulation on the embedded chain, 5 participants: one proposes the noise x100
    attack (and accepts everything as a voter), one copies others' accepted updates. Every
    honest voter refuses the noise update for its size and the copies as copies, before
    scoring, and refuses no honest proposal."""
    source = write_records(tmp_path / "source.jsonl", dolly_records(per_category=12))
    run_split(SplitConfig(input=str(source), out=tmp_path / "split", clients=5, min_size=8,
                          scheme="iid", test_per_category=2))  # fmt: skip
    cfg = flock_recipe(
        tiny_model_dir, tmp_path / "split", f"run.out='{tmp_path / 'run'}'", "fed.rounds=3",
        "flock.proposers_per_round=3", "flock.voters_per_round=2",
        "attack.kind=noise", "attack.strength=100", "attack.malicious_fraction=0.2",
        "eval.sample_instructions=0",
    )  # fmt: skip
    model, tokenizer = load_base_model(cfg.model)
    fed = engine.prepare(cfg, model, tokenizer, base_model_id(cfg.model))
    sim = setup(cfg, fed, tmp_path / "run", None)
    (noisy,) = sim.attackers
    copier = next(i for i in range(len(sim.agents)) if i != noisy)
    honest = {i for i in range(len(sim.agents)) if i not in (noisy, copier)}
    agent = sim.agents[copier]
    sim.agents[copier] = Copier(**{f.name: getattr(agent, f.name) for f in fields(agent)})
    seen = {"noise": 0, "copy": 0, "honest": 0}
    for round_ in range(cfg.fed.rounds):
        sim.drive(lambda r=round_: sim.task.current_round() > r or sim.task.phase() in FINISHED)
        proposers = [sim.index(p) for p in sim.task.proposers_of(round_)]
        copied = sim.agents[copier].state.round(round_).get("copied")
        for voter in (sim.index(v) for v in sim.task.voters_of(round_)):
            if voter not in honest:
                continue
            ballot = sim.agents[voter].state.round(round_)["ballot"]
            for proposer, refused in zip(proposers, ballot["refused"], strict=True):
                if proposer == noisy:
                    assert refused is not None and "exceeds the bound" in refused, refused
                    assert "train.max_steps=4 AdamW steps at train.lr=0.03" in refused
                    seen["noise"] += 1
                elif proposer == copier and copied:
                    author = sim.agents[sim.index(copied["author"])].address
                    assert refused is not None, ballot
                    assert refused.startswith(f"a copy of {author}'s proposal of round "), refused
                    seen["copy"] += 1
                else:
                    assert refused is None, (round_, proposer, refused)
                    seen["honest"] += 1
    assert all(seen.values()), seen  # the draw put each before an honest voter at least once
    last = cfg.fed.rounds - 1
    for voter in sim.task.voters_of(last):  # a sketch of every round so far, proposer or not
        folder = sim.agents[sim.index(voter)].folder / "sketches"
        assert sorted(p.name for p in folder.iterdir()) == [
            f"round_{r:04d}.safetensors" for r in range(last + 1)
        ]


@pytest.mark.chain
@pytest.mark.parametrize("proposal", ["1e30", "made_for_round_1"])
def test_every_party_leaves_out_an_accepted_update_that_breaks_the_rules(
    tmp_path: Path, proposal: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Colluding voters accept, on chain, an update of 1e30s, or one whose blob was made for
    another round: the derivation of the global adapter (`Ledger.global_state`, which every
    participant and `covey flock fetch` run) leaves it out under FLock's default bound, as
    an honest voter refuses it, and round 1 starts from the initial adapter."""
    world = World.create(accounts=4)
    task = world.task()
    members = world.people[:3]
    join_all(task, members)
    start_task(task)
    seed_and_draw(task, members)
    (proposer,) = task.proposers_of(0)
    store = LocalStore(tmp_path / "store")
    g = torch.Generator().manual_seed(0)
    initial = {
        "base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 16, generator=g),
        "base_model.model.layers.0.q_proj.lora_B.weight": torch.zeros(16, 4),
    }
    initial_cid = store.put(global_bytes(initial, "tiny-base"))
    if proposal == "1e30":
        update, made_for = {k: torch.full_like(v, 1e30) for k, v in initial.items()}, 0
    else:
        update, made_for = {k: v + 0.001 for k, v in initial.items()}, 1
    blob = update_bytes(update, initial, initial_cid, Codec(), task=task.address, round_=made_for)
    digest = digest_of(store.put(blob))
    salt = b"\x01" * 32
    task.commit_proposal(proposal_commitment(digest, salt, proposer), sender=proposer)
    task.advance_to_phase(Phase.PROPOSE_REVEAL)
    task.reveal_proposal(digest, salt, sender=proposer)
    vote(task)  # every voter accepts
    task.advance_to_phase(Phase.AWAIT_FINALIZE)
    task.finalize()
    assert task.result(0).outcome == Outcome.ACCEPTED
    cfg = load_recipe(None, ["fed.consensus=flock", "train.max_steps=4", "train.lr=1e-3"])
    ledger = Ledger(task, Blobs(store), initial_cid, cfg.fed, "tiny-base", train=cfg.train)
    with caplog.at_level("WARNING", logger="covey.flock"):
        state, cid = ledger.global_state(1)
    assert cid == initial_cid and all(torch.equal(state[k], initial[k]) for k in initial)
    expected = "exceeds the bound" if proposal == "1e30" else "made for round 1, not round 0"
    assert f"round 0: accepted update {cid_from_digest(digest)} left out" in caplog.text
    assert expected in caplog.text
