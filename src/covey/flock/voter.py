"""A voter's ballot: fetch every proposal of the round, check it, and score it privately.

`Voter.judge(round)` is what a FLock participant does in VOTE_COMMIT when it was drawn to
vote: fetch each valid proposal by CID (by a deadline that leaves the scoring and the commit
time to fit in the window), read it as this task's and round's proposal, refuse it if it fails
the task's validation or copies the delta another proposer published in an earlier round
(`covey.flock.copies`), and score the rest on the participant's private validation examples
(`covey.flock.scoring.judge_proposals`). The participant (`covey.flock.agent`) commits the
ballot; an experiment's dishonest voter (`Behaviour.vote`) overrides its verdicts there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from covey.config import RunConfig
from covey.data.prompts import Example
from covey.errors import DataError
from covey.fed.rounds import RunModel
from covey.flock.copies import RoundSketches, SketchBook, find_copy
from covey.flock.ledger import Blobs, Ledger, read_update
from covey.flock.scoring import RoundRule, judge_proposals
from covey.flock.task import FlockTask
from covey.state import State
from covey.store.cid import cid_from_digest

log = logging.getLogger("covey.flock.agent")  # a voter logs as the participant it is


@dataclass
class Voter:
    """What a participant judges proposals with: the task, its private validation examples,
    where blobs come from, and its sketches of earlier rounds' proposals."""

    task: FlockTask
    cfg: RunConfig
    model: RunModel
    validation: Sequence[Example]
    blobs: Blobs
    ledger: Ledger
    sketches: SketchBook
    name: str

    def judge(self, round_: int) -> dict[str, Any]:
        """Fetch every valid proposal by CID, check it, and score it on the private validation
        split: the ballot, a verdict per proposer in draw order. A proposal is refused before
        scoring (`refused` says why; a proposer without a valid proposal is rejected too) when
        it cannot be fetched or read as this round's proposal of this task, fails validation
        (`Ledger.update_problem`: structure, finite values, the task's norm bound), or copies
        the delta another proposer published in an earlier round (`covey.flock.copies`)."""
        started = time.perf_counter()
        deadline = self.fetch_deadline()
        global_state, global_cid = self.ledger.global_state(round_)
        digests = dict(self.task.proposals(round_))
        proposers = self.task.proposers_of(round_)
        earlier = SketchBook.earlier(self.earlier_sketches(round_, deadline))
        this_round = RoundSketches()
        candidates: list[State | None] = []
        cids: list[str | None] = []
        refused: list[str | None] = []
        for proposer in proposers:
            state: State | None = None
            problem = ""
            cid = cid_from_digest(digests[proposer]) if proposer in digests else None
            if cid is not None:
                state, problem = self.read_proposal(
                    round_, proposer, cid, global_state, global_cid, deadline
                )
                sketch = None
                if state is not None:
                    sketch = self.sketches.sketcher.sketch(state, global_state)
                    copy = find_copy(sketch, proposer, earlier, self.cfg.flock.copy_cosine)
                    if copy is not None:
                        state, problem = None, copy.reason()
                this_round.add(proposer, sketch)
                if problem:
                    log.warning(
                        "%s: round %d: proposal %s refused: %s", self.name, round_, cid, problem
                    )
            candidates.append(state)
            cids.append(cid)
            refused.append(problem or None)
        self.sketches.save(round_, this_round)  # later rounds compare with these
        flock = self.cfg.flock
        rule = None
        if flock.round_relative:
            rule = RoundRule(
                max_norm_ratio=flock.round_max_norm_ratio,
                min_cosine=flock.round_min_cosine,
                max_relative_z=flock.round_max_relative_z,
                trust_gain_z=flock.round_trust_gain_z,
            )
        judged = judge_proposals(
            self.model.model, self.validation, global_state, candidates, flock.harm_z,
            self.cfg.eval.batch_size, self.model.pad_id, rule,
        )  # fmt: skip
        return {
            "accepts": [j is not None and j.accept for j in judged],
            "cids": cids,
            "gains": [None if j is None else round(j.gain, 6) for j in judged],
            "harm_z": [None if j is None else round(j.harm_z, 3) for j in judged],
            "reasons": [None if j is None else j.reason for j in judged],
            "refused": refused,
            "round_views": [
                None if j is None or j.round_view is None else _rounded(asdict(j.round_view))
                for j in judged
            ],
            "seconds": time.perf_counter() - started,
        }

    def fetch_deadline(self) -> float | None:
        """When a ballot's fetching must stop (`time.monotonic()`), so that scoring and the
        commit still fit in the window however slow the peers are: half of what is left of the
        current window, at the chain's recent pace. None where no time passes between blocks
        (the embedded chain): each fetch is then bounded by its own limits alone."""
        pace = self.task.chain.seconds_per_block()
        if pace <= 0:
            return None
        blocks_left = self.task.phase_end() - self.task.chain.next_block
        blocks_left -= self.task.chain.margin_blocks
        return time.monotonic() + max(0.0, blocks_left * pace / 2)

    def read_proposal(
        self,
        round_: int,
        proposer: str,
        cid: str,
        global_state: State,
        global_cid: str,
        deadline: float | None = None,
    ) -> tuple[State | None, str]:
        """(`proposer`'s update of round `round_`, "") or (None, why it is unusable): fetched
        by CID (the bytes are re-hashed against it) by `deadline`, decoded as a proposal of
        this task and round against its global adapter, and valid by the task's rules."""
        try:
            data = self.blobs.get(cid, proposer, deadline=deadline)
            state = read_update(
                data, global_state, global_cid, self.ledger.codec, task=self.task.address,
                round_=round_,
            )  # fmt: skip
        except DataError as e:
            return None, str(e)
        problem = self.ledger.update_problem(state, global_state)
        return (None, problem) if problem else (state, "")

    def earlier_sketches(
        self, round_: int, deadline: float | None = None
    ) -> list[tuple[int, RoundSketches]]:
        """The sketches of every valid proposal of the rounds before `round_`; a round this
        participant has not looked at yet (it proposed, or was not drawn) is sketched now from
        the blobs, which it holds or fetches (each at most once: one nobody serves when asked
        is unusable for good, so a withheld blob cannot cost every later vote a fetch)."""
        rounds = []
        for r in range(round_):
            known = self.sketches.load(r)
            if known is None:
                known = RoundSketches()
                global_state, global_cid = self.ledger.global_state(r)
                for proposer, digest in self.task.proposals(r):
                    cid = cid_from_digest(digest)
                    state, problem = self.read_proposal(
                        r, proposer, cid, global_state, global_cid, deadline
                    )
                    if problem:
                        log.info("%s: round %d: proposal %s not compared: %s",
                                 self.name, r, cid, problem)  # fmt: skip
                    sketch = None
                    if state is not None:
                        sketch = self.sketches.sketcher.sketch(state, global_state)
                    known.add(proposer, sketch)
                self.sketches.save(r, known)
            rounds.append((r, known))
        return rounds


def _rounded(view: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in view.items()}
