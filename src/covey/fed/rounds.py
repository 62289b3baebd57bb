"""The round loop every engine shares: open a run folder, play rounds, aggregate, evaluate, save.

Three engines play rounds: in-process clients (`covey.fed.engine`), SuperNodes over Flower's
grid (`covey.flower.server_app`) and FLock's participants (`covey.flock.protocol`). They differ
only in how a round is played (who trains, how updates travel, who decides what is accepted),
so each passes a `PlayRound` function to `run_rounds`, and everything else is here, once:

    folder = RunFolder.check(cfg, resume)        # before any model loads: nothing to lose yet
    ...load the model, tokenize...
    history = run_rounds(cfg, folder, run_model, play, hooks)
        # for each remaining round: play it (accepted updates go into fed.strategy's
        # accumulator as they arrive), aggregate, evaluate, save the round folder atomically

A round's `round.json` has the layout of `covey.fed.runfolder.RoundRecord`, which owns the run
folder's format; engine-specific parts (FLock's roles and payouts, Flower's bytes and nodes)
sit in `RoundRecord.engine` and are written beside the common keys. The loop saves each round
(the checkpoint), then tells the trackers; loss.png is drawn once, when the run ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from covey.config import RunConfig, config_differences, load_recipe, to_toml
from covey.data.prompts import Example, tokenize_records
from covey.data.records import Record, spread
from covey.errors import ConfigError
from covey.fed import runfolder
from covey.fed.runfolder import RoundRecord, train_summary
from covey.fed.strategies import Accumulator, get_strategy
from covey.fed.tracking import Trackers, check_available
from covey.model.lora import adapter_files, adapter_state, load_adapter_state, wrap_with_lora
from covey.state import ServerState, State
from covey.train.evaluate import evaluate_loss, generate_answers
from covey.train.local import StepCallback

log = logging.getLogger("covey.fed")

RESUMABLE_CHANGES = ("fed.rounds", "run.out")
"""Settings a resumed run may change: more rounds, or the folder moved."""


# ---------------------------------------------------------------- what a round function returns


@dataclass
class Played:
    """What an engine's round function hands back to the loop, after feeding the accepted
    updates to `merge` (the strategy's accumulator, opened by the loop)."""

    selected: list[int]
    merge: Accumulator
    merged: list[dict[str, Any]] = field(default_factory=list)
    """`client_line` of every update added to `merge`."""
    rejected: list[dict[str, Any]] = field(default_factory=list)
    trained: list[dict[str, Any]] = field(default_factory=list)
    """`client_line` of every update trained this round, accepted or not (`train_summary`)."""
    train_seconds: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    """Engine-specific timings beside round/train/eval (FLock: `vote`)."""
    traffic: dict[str, Any] = field(default_factory=dict)
    """`RoundRecord.traffic`."""
    engine: dict[str, Any] = field(default_factory=dict)
    """`RoundRecord.engine`."""
    files: dict[str, bytes] = field(default_factory=dict)
    """Engine files saved inside the round folder, atomically with it (FLock: the embedded
    chain's state, to resume from)."""
    next_state: State | None = None
    """The next global adapter, when the engine derives it itself (FLock: from the chain, as
    every participant does); the loop then leaves `merge` unfinished and skips `fed.strategy`,
    and the engine appends the merged updates' lines to `merged` without calling `accept`."""
    aggregation: dict[str, Any] = field(default_factory=dict)
    """With `next_state`: what the rule that derived it did (`RoundRecord.aggregation`; FLock:
    the ledger's report, so a robust rule's choices are on record as in the other engines)."""

    def accept(self, state: State, weight: float, line: dict[str, Any]) -> None:
        """Merge an update that passed the engine's decision; `line` is its `client_line`.
        The FedAvg family sums it at once, so the round need not keep it (a robust rule's
        accumulator keeps it)."""
        self.merge.add(state, weight)
        self.merged.append(line)


PlayRound = Callable[[int, State, Accumulator], Played]
"""`play(round_index, global_state, merge) -> Played`: one engine's way of playing a round; it
hands `merge` to its `Played` and accepts updates into it as they arrive."""


@dataclass
class Hooks:
    """Progress callbacks (the CLI draws bars with them; tests leave them empty)."""

    round_start: Callable[[int, int, list[int]], None] = lambda r, total, selected: None
    client_start: Callable[[int, int], None] = lambda client, n_examples: None
    step: StepCallback | None = None
    round_end: Callable[[RoundRecord], None] = lambda record: None


# ---------------------------------------------------------------- held-out data and the model


@dataclass
class HeldOut:
    """The held-out test records a run evaluates on, tokenized once."""

    records: list[Record]
    examples: list[Example]
    samples: list[Record]
    """Fixed instructions whose answers every round records."""
    scored: list[Record] = field(default_factory=list)
    """Fixed records whose answers every round scores with ROUGE-L (`eval.rouge_examples`)."""


def held_out(cfg: RunConfig, test_records: list[Record], tokenizer: Any) -> HeldOut:
    """Tokenize `eval.max_examples` test records (responses only) and pick the sample
    instructions and the ROUGE-L records, each spread over the test set (it is grouped by
    category, so its first records would be one or two categories only)."""
    evaluated = (
        spread(test_records, cfg.eval.max_examples) if cfg.eval.max_examples else test_records
    )
    step = max(1, len(test_records) // max(cfg.eval.sample_instructions, 1))
    samples = test_records[::step][: cfg.eval.sample_instructions]
    scored = spread(test_records, cfg.eval.rouge_examples)
    examples = tokenize_records(evaluated, tokenizer, cfg.prompt, mask_prompt=True)
    check_targets(examples, "test.jsonl", cfg)
    return HeldOut(records=evaluated, examples=examples, samples=samples, scored=scored)


def check_targets(examples: list[Example], name: str, cfg: RunConfig) -> None:
    """Responses cut off by `cutoff_len` teach (and measure) nothing: warn, or stop if all are."""
    empty = sum(1 for e in examples if e.num_target_tokens == 0)
    if empty == len(examples):
        raise ConfigError(
            f"{name}: prompt.cutoff_len = {cfg.prompt.cutoff_len} cuts off every response; "
            "raise prompt.cutoff_len"
        )
    if empty:
        log.warning(
            "%s: %d of %d examples lose their whole response to prompt.cutoff_len = %d",
            name, empty, len(examples), cfg.prompt.cutoff_len,
        )  # fmt: skip


@dataclass
class RunModel:
    """The model a run evaluates global adapters with and writes them from: the base model
    wrapped with LoRA, its tokenizer and identity, and the held-out set."""

    model: Any
    tokenizer: Any
    base_model_id: str
    held_out: HeldOut

    @classmethod
    def build(
        cls,
        cfg: RunConfig,
        base: Any,
        tokenizer: Any,
        base_model_id: str,
        test_records: list[Record] | None = None,
    ) -> RunModel:
        """Wrap the loaded `base` with the recipe's LoRA adapter, seeded by `run.seed` so every
        engine starts from the same adapter, and tokenize `test_records` as the held-out set
        (none: nothing to evaluate on, as a FLock participant)."""
        torch.manual_seed(cfg.run.seed)
        model = wrap_with_lora(base, cfg.lora)
        held = (
            HeldOut(records=[], examples=[], samples=[])
            if test_records is None
            else held_out(cfg, test_records, tokenizer)
        )
        return cls(model=model, tokenizer=tokenizer, base_model_id=base_model_id, held_out=held)

    def evaluate(self, cfg: RunConfig, state: State) -> dict[str, Any]:
        """`eval` and `answers` of the adapter `state`."""
        load_adapter_state(self.model, state)
        examples = self.held_out.examples
        metrics = evaluate_loss(self.model, examples, cfg.eval.batch_size, self.pad_id)
        answers = generate_answers(
            self.model,
            self.tokenizer,
            self.held_out.samples,
            cfg.prompt.template,
            cfg.eval.max_new_tokens,
            cfg.eval.batch_size,
        )
        metrics |= {"examples": len(examples)} | self._answer_quality(cfg)
        return {"eval": metrics, "answers": answers}

    def _answer_quality(self, cfg: RunConfig) -> dict[str, float]:
        """ROUGE-L F1 and heavy repetition of greedy answers to the fixed scored records."""
        scored = self.held_out.scored
        if not scored:
            return {}
        from covey.train.metrics import answer_scores, summarize

        answers = generate_answers(
            self.model,
            self.tokenizer,
            scored,
            cfg.prompt.template,
            cfg.eval.rouge_max_new_tokens,
            cfg.eval.batch_size,
        )
        quality = summarize(
            [answer_scores(a["answer"], r.response) for a, r in zip(answers, scored, strict=True)]
        )
        return {
            "rouge_l": quality["rouge_l"],
            "heavy_repetition": quality["heavy_repetition"],
            "rouge_examples": len(scored),
        }

    def backdoor(self, cfg: RunConfig, state: State) -> dict[str, Any]:
        """`covey.fed.backdoor.backdoor_metrics` of the adapter `state` on the held-out
        records (the final round's `eval.backdoor` in every attack run)."""
        from covey.fed.backdoor import backdoor_metrics

        load_adapter_state(self.model, state)
        return backdoor_metrics(self.model, self.tokenizer, self.held_out.records, cfg, self.pad_id)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


# ---------------------------------------------------------------- the run folder


@dataclass
class RunHistory:
    """A finished (or resumed and finished) run: its folder and every round's record."""

    out: Path
    rounds: list[RoundRecord] = field(default_factory=list)

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every round's record as round.json holds it (for readers of the JSON form)."""
        return [record.to_dict() for record in self.rounds]


class RunFolder:
    """`run.out`: new, or resumed from its last complete round (its format:
    `covey.fed.runfolder`).

    `check` runs before anything is loaded, so a refused resume costs nothing and says which
    settings differ; `begin` writes the baseline (round 0) or loads the last round; `save`
    checkpoints a round and `finish` copies the last one to final/. Plots and trackers are the
    loop's (`run_rounds`), not the checkpoint's.
    """

    def __init__(self, cfg: RunConfig, done: list[int]) -> None:
        self.cfg = cfg
        self.out = Path(cfg.run.out)
        self.config_toml = to_toml(cfg)
        self.done = done
        self.records: list[RoundRecord] = []

    @classmethod
    def check(
        cls,
        cfg: RunConfig,
        resume: bool,
        how_to_resume: str = "pass --resume to continue it, --overwrite to start again",
    ) -> RunFolder:
        """Refuse to overwrite finished rounds without `resume`, or to resume with settings
        other than the run's (`how_to_resume`: the engine's way of asking, for the error).

        A server run may grow `fed.rounds`; a FLock task's contract was deployed for its
        rounds, so nothing may change."""
        out = Path(cfg.run.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"run.out {out} is a file; choose a folder")
        done = runfolder.complete_rounds(out)
        if done and not resume:
            raise ConfigError(
                f"run.out {out} already holds rounds {done[0]}..{done[-1]}; {how_to_resume}, "
                "or choose another run.out"
            )
        if done:
            may_change = () if cfg.fed.consensus == "flock" else RESUMABLE_CHANGES
            _check_same_settings(out, done[0], cfg, may_change)
        check_available(cfg.run.report_to)
        return cls(cfg, done)

    @property
    def next_round(self) -> int:
        return self.records[-1].round + 1 if self.records else 0

    def begin(
        self,
        run_model: RunModel,
        baseline: dict[str, Any] | None = None,
        baseline_files: dict[str, bytes] | None = None,
    ) -> tuple[State, ServerState]:
        """The global adapter and server state to continue from: the last complete round's,
        or, for a new run, the model's initial adapter after evaluating and saving it as
        round 0 (`baseline`, `baseline_files`: its engine-specific parts and files)."""
        if self.done:
            for name in runfolder.remove_stale_staging(self.out):
                log.info("removed %s, left by an interrupted write", name)
            *earlier, last = self.done
            state, server_state, last_record = runfolder.load_round(self.out, last)
            self.records = [runfolder.read_record(self.out, k, check_hash=True) for k in earlier]
            self.records.append(last_record)
            log.info("resuming %s after round %d", self.out, last)
            return state, server_state
        runfolder.write_config(self.out, self.config_toml)
        state = adapter_state(run_model.model)
        record = RoundRecord(round=0, engine=baseline or {})
        evaluation = run_model.evaluate(self.cfg, state)
        record.eval, record.answers = evaluation["eval"], evaluation["answers"]
        self.save(run_model, record, state, {}, baseline_files or {})
        return state, {}

    def save(
        self,
        run_model: RunModel,
        record: RoundRecord,
        state: State,
        server_state: ServerState,
        engine_files: dict[str, bytes],
    ) -> RoundRecord:
        """Write the round folder atomically, then metrics.jsonl; return the record as saved
        (with its content hash)."""
        record.base_model = run_model.base_model_id
        record.config_fingerprint = self.cfg.fingerprint()
        files = adapter_files(run_model.model, state, run_model.base_model_id)
        clash = sorted(set(files) & set(engine_files))
        if clash:
            raise ValueError(f"engine files {clash} would overwrite the adapter's files")
        files |= engine_files
        saved = runfolder.write_round(self.out, record, files, server_state, self.config_toml)
        self.records.append(saved)
        runfolder.write_metrics(self.out, self.records)
        return saved

    def finish(self) -> RunHistory:
        """Copy the last round to final/ and draw loss.png."""
        runfolder.write_final(self.out, self.records[-1].round)
        from covey.fed.report import plot_losses  # matplotlib loads only when needed

        plot_losses(self.records, self.out / runfolder.LOSS_PLOT)
        return RunHistory(out=self.out, rounds=self.records)


def _check_same_settings(
    out: Path, first_round: int, cfg: RunConfig, may_change: tuple[str, ...]
) -> None:
    """A resumed run must use the settings it started with, but for `may_change`; the error
    names every setting that differs, with both values."""
    saved_toml = runfolder.round_dir(out, first_round) / runfolder.CONFIG
    try:
        saved = load_recipe(saved_toml)
    except ConfigError:  # made by another Covey version: compare what can be compared
        record = runfolder.read_record(out, first_round)
        if record.config_fingerprint == cfg.fingerprint(RESUMABLE_CHANGES):
            return
        raise ConfigError(
            f"run.out {out} was made with other settings (see {saved_toml}); resume with the "
            "recipe and --set values it was made with, or choose another run.out"
        ) from None
    differences = config_differences(saved, cfg, exclude=("run.out", *may_change))
    if differences:
        allowed = " and ".join(sorted(set(may_change) - {"run.out"})) or "nothing"
        raise ConfigError(
            f"run.out {out} was made with other settings ({'; '.join(differences)}); resume "
            f"with the recipe and --set values it was made with (only {allowed} may change), "
            "or choose another run.out"
        )


# ---------------------------------------------------------------- the loop


def run_rounds(
    cfg: RunConfig,
    folder: RunFolder,
    run_model: RunModel,
    play: PlayRound,
    hooks: Hooks | None = None,
    baseline: dict[str, Any] | None = None,
    baseline_files: dict[str, bytes] | None = None,
) -> RunHistory:
    """Play every remaining round of `cfg`: play, aggregate with `fed.strategy`, evaluate, save.

    The last round of a run with an attack also measures the backdoor (`eval.backdoor`).
    `baseline` and `baseline_files` are the engine-specific parts of round 0 for a new run.
    """
    hooks = hooks or Hooks()
    strategy = get_strategy(cfg.fed.strategy)
    trackers = Trackers(cfg, folder.out)  # `run.report_to`: nothing is sent before this
    global_state, server_state = folder.begin(run_model, baseline, baseline_files)
    for written in folder.records[len(folder.done) :]:  # a new run's baseline
        trackers.log_round(written.to_dict())
    for round_index in range(folder.next_round, cfg.fed.rounds + 1):
        started = time.perf_counter()
        played = play(round_index, global_state, strategy.start(global_state))
        aggregation: dict[str, Any] = {}
        if played.next_state is not None:
            global_state, aggregation = played.next_state, played.aggregation
        else:
            global_state, server_state = played.merge.finish(server_state, cfg.fed)
            aggregation = played.merge.report
        eval_started = time.perf_counter()
        evaluation = run_model.evaluate(cfg, global_state)
        if round_index == cfg.fed.rounds and cfg.attack.kind != "none":
            evaluation["eval"]["backdoor"] = run_model.backdoor(cfg, global_state)
        record = RoundRecord(
            round=round_index,
            selected=played.selected,
            clients=played.merged,
            rejected=played.rejected,
            aggregation=aggregation,
            train=train_summary(played.trained),
            eval=evaluation["eval"],
            answers=evaluation["answers"],
            # "train" is the clients' step loops and "eval" the held-out passes; the rest of
            # "round" is the engine's own (selection, transfer, validation, voting, aggregation)
            seconds={
                "round": time.perf_counter() - started,
                "train": played.train_seconds,
                "eval": time.perf_counter() - eval_started,
                **played.seconds,
            },
            traffic=played.traffic,
            engine=played.engine,
        )
        saved = folder.save(run_model, record, global_state, server_state, played.files)
        trackers.log_round(saved.to_dict())
        hooks.round_end(saved)
    trackers.close()
    return folder.finish()
