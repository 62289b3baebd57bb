"""The rules never pay anyone to lie (issue 26, findings 5-9): each economic scenario in
tests/flock/incentives.py gains its cheating party something under FlockTask v2 (main 6617e05)
and nothing under today's contract. The table of gains is benchmarks/bench_incentives.py's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.flock import World
from tests.flock.incentives import SCENARIOS, Outcome

pytestmark = pytest.mark.chain


@pytest.fixture(scope="module")
def world() -> World:
    return World.create(accounts=14)


@pytest.fixture
def w(world: World) -> Iterator[World]:
    world.reset()
    yield world


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_cheating_paid_under_v2_and_does_not_now(w: World, name: str) -> None:
    before = SCENARIOS[name](w, "v2")
    w.reset()
    now = SCENARIOS[name](w, "v3")
    print(f"{name}: gain from cheating v2 {before.gain:+.2f}, v3 {now.gain:+.2f}")
    if name.startswith("squatter"):
        # squatting paid nothing directly: it was free (and kept others out); now it costs
        assert before.gain == 0 and now.gain <= -2.0, (before, now)
        return
    assert before.gain > 0, before
    if name.startswith("creator as keeper"):
        # keeper fees pay for real transactions; the creator can keep at most the 5% cap
        assert now.gain <= 5.0, now
    elif name.startswith("last revealer"):
        # its proposer share under v3 stays near fair (1/8 = 12.5 of 100), v2 well above
        assert before.cheat >= 7 / 12 * 100 and now.cheat <= 5 / 12 * 100, (before, now)
    else:
        assert now.gain <= 0, now


def test_outcome_reports_the_gain() -> None:
    assert Outcome("v3", honest=1.5, cheat=-0.5).gain == -2.0
