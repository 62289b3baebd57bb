"""Where a participant fetches blobs from: peers' registered endpoints are untrusted.

A participant registers its endpoint on chain; `Blobs` asks every member's. A registrant that
calls the contract directly (past `validate_endpoint`) can store any string there: `Blobs` skips
the ones that are not `http(s)://host[:port]`, and the rest reach only public addresses unless
the task sets `flock.allow_private_endpoints`. The loopback canary records every request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from covey.errors import DataError
from covey.flock.ledger import Blobs
from covey.store.cid import cid_for
from covey.store.fetch import FetchLimits
from covey.store.gateway import Gateway
from covey.store.local import LocalStore
from tests.flock import World
from tests.store.peers import Peer, answer, silent

BLOB = b"an update every voter fetches"
CID = cid_for(BLOB)


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


@pytest.fixture
def w(world: World) -> Iterator[World]:
    world.reset()
    yield world


@pytest.mark.chain
def test_registered_endpoints_cannot_aim_fetches_at_the_voters_network(
    w: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    task = w.task()
    with Peer(answer(BLOB)) as canary, Gateway(LocalStore(tmp_path / "mine")) as mine:
        mine.store.put(BLOB)
        forger, loopback, named, quiet = w.people[:4]
        for who in (forger, loopback, named, quiet):
            task.join(sender=who)
        # straight to the contract: validate_endpoint would refuse the first one
        forged = f"{canary.url}/admin/delete-all?confirm=yes#"
        task.transact("set_endpoint", forged, sender=forger)
        task.set_endpoint(canary.url, sender=loopback)
        task.set_endpoint(f"http://localhost:{canary.port}", sender=named)
        blobs = Blobs(
            LocalStore(tmp_path / "voter"), task, [mine.url], limits=FetchLimits(hedge_s=0.05)
        )
        with caplog.at_level(logging.WARNING, "covey.flock"):
            assert blobs.get(CID, forger) == BLOB  # from the voter's own --gateway
        assert canary.requests == []
        assert f"skipping {forger}'s endpoint" in caplog.text
        assert "has a query" in caplog.text

        # a LAN task allows private addresses: the loopback endpoints are asked now, but only
        # ever for /ipfs/{cid}; the forged one is still skipped
        lan = Blobs(LocalStore(tmp_path / "lan"), task, allow_private_endpoints=True)
        assert lan.get(CID, forger) == BLOB
        assert {r.line.split()[1] for r in canary.requests} == {f"/ipfs/{CID}?format=raw"}


def test_a_caller_deadline_bounds_a_blob(tmp_path: Path) -> None:
    """`Blobs.get(..., deadline=)`: a voter stops fetching when its phase window closes."""
    with Peer(silent) as mute:
        blobs = Blobs(LocalStore(tmp_path / "voter"), gateways=[mute.url])
        started = time.monotonic()
        with pytest.raises(DataError, match="before its deadline"):
            blobs.get(CID, deadline=started + 1.0)
        assert time.monotonic() - started < 2.0
        assert blobs.fetch_s < 2.0
