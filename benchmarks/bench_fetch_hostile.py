"""What one blob costs a fetcher facing hostile peers, at the default limits: old vs new.

Real servers on loopback: five honest Covey gateways holding a 1 MiB blob, and two hostile
peers from tests/store/peers.py: a drip (declares the blob, then sends one byte every 0.5 s)
and a silent server (accepts, reads the request, never answers). Each scenario runs with
`covey.store.fetch.fetch` at `FetchLimits()` and with the fetcher as it was before deadlines
(commit 349d622, loaded from git: a 30-s timeout per read, 3 tries, redirects followed), and
records the wall time and whether the blob came back. Hostile peers give up after --cap-s
(default 40 s) so that the old fetcher's runs end at all: its drip figures are "as long as the
peer likes", capped.

    .venv/bin/python benchmarks/bench_fetch_hostile.py [--skip-old]

Writes benchmarks/results/fetch_hostile.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.store import peers  # noqa: E402

from covey.errors import DataError  # noqa: E402
from covey.store.cid import cid_for  # noqa: E402
from covey.store.fetch import FetchLimits, Source, fetch  # noqa: E402
from covey.store.gateway import Gateway  # noqa: E402
from covey.store.local import LocalStore  # noqa: E402

OLD_COMMIT = "349d622"
BLOB = bytes(range(256)) * 4096  # 1 MiB
CID = cid_for(BLOB)


def old_fetcher() -> Callable[..., bytes]:
    """`fetch` as it was at OLD_COMMIT (its module source from git, run in a fresh module)."""
    source = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:src/covey/store/fetch.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    module = types.ModuleType("covey_old_fetch")
    exec(compile(source, f"{OLD_COMMIT}:src/covey/store/fetch.py", "exec"), module.__dict__)
    return module.fetch  # type: ignore[no-any-return]


def run(fetcher: str, urls: list[str], old: Callable[..., bytes] | None) -> dict[str, Any]:
    started = time.monotonic()
    try:
        if fetcher == "old":
            assert old is not None
            data = old(CID, urls)
        else:  # loopback peers: allowed here as the user's own gateways would be
            data = fetch(CID, [Source(u, allow_private=True) for u in urls])
        outcome = "blob" if data == BLOB else "wrong bytes"
    except DataError as e:
        outcome = f"DataError: {str(e)[:300]}"
    return {"seconds": round(time.monotonic() - started, 2), "outcome": outcome}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-old", action="store_true", help="Only the new fetcher.")
    parser.add_argument("--cap-s", type=float, default=40.0, help="Hostile peers give up here.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/fetch_hostile.json")
    args = parser.parse_args()
    peers.LIFETIME_S = args.cap_s
    old = None if args.skip_old else old_fetcher()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        honest = []
        for i in range(5):
            store = LocalStore(Path(tmp) / f"honest_{i}")
            store.put(BLOB)
            honest.append(Gateway(store).start())
        urls = [g.url for g in honest]
        try:
            for name, behaviour, where in [
                ("five honest", None, None),
                ("drip alone", peers.drip(BLOB, every_s=0.5), "alone"),
                ("silent alone", peers.silent, "alone"),
                ("drip first, then five honest", peers.drip(BLOB, every_s=0.5), "first"),
                ("silent first, then five honest", peers.silent, "first"),
                ("drip last, after five honest", peers.drip(BLOB, every_s=0.5), "last"),
            ]:
                for fetcher in ("new",) if old is None else ("new", "old"):
                    if behaviour is None:
                        row = run(fetcher, urls, old)
                    else:
                        with peers.Peer(behaviour) as hostile:
                            sources = {
                                "alone": [hostile.url],
                                "first": [hostile.url, *urls],
                                "last": [*urls, hostile.url],
                            }[where or "alone"]
                            row = run(fetcher, sources, old)
                    row = {"scenario": name, "fetcher": fetcher, **row}
                    print(json.dumps(row), flush=True)
                    results.append(row)
        finally:
            for g in honest:
                g.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": " ".join(["benchmarks/bench_fetch_hostile.py", *sys.argv[1:]]),
                "machine": {"python": platform.python_version(), "platform": platform.platform()},
                "limits": vars(FetchLimits()),
                "old": f"{OLD_COMMIT}: timeout=30 s per read, attempts=3, backoff=1 s",
                "hostile_cap_s": args.cap_s,
                "blob_bytes": len(BLOB),
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
