"""Honest-fetch latency from a blob gateway under hostile load (issue #26: a proposer whose
gateway is starved while it reveals is slashed).

Three processes on loopback, so that none waits on another's interpreter lock (they do share
the machine's cores): the gateway (`covey.store.gateway.Gateway` over a store holding one random
blob), an attacker, and the honest client here, which fetches the blob `--fetches` times, one
every `--interval` s, each on a fresh connection (as `covey.store.fetch` does), re-hashing it,
with a 10 s timeout. Scenarios: no attacker; `--idle` connections (opened one after the other,
each given 1 s to connect) from one address, then spread over `--peers` addresses, held idle;
the same, re-opening each connection the gateway closes (so the attacker keeps trying to
hold them all, at the rate its process can); `--slowloris` clients, each dripping a request
header a byte every 0.5 s from its own address (re-opened when cut). Peers are distinct
127.0.0.0/8 addresses (Linux). Writes benchmarks/results/gateway.json (or `--out`).

    .venv/bin/python benchmarks/bench_gateway.py [--fetches 50 --blob-mb 2 --idle 500 --peers 50]

`--label` names the server measured: run with `PYTHONPATH=<old checkout>/src` and `--label old
--out ...` to measure an earlier gateway with the same script.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import platform
import resource
import select
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIP_SECONDS = 0.5


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def source_for(n: int) -> str:
    """The n-th attacker address (n >= 1): 127.0.0.2, 127.0.0.3, ... (the client is 127.0.0.1)."""
    return f"127.0.{n // 250}.{n % 250 + 1}"


# --- the gateway process --------------------------------------------------------------------


def serve(store_dir: str, fd_limit: int) -> None:
    """Serve `store_dir` until stdin closes: print the URL first, the gateway's counts for each
    line read, and how long stop() took at the end."""
    from covey.store.gateway import Gateway
    from covey.store.local import LocalStore

    raise_fd_limit()
    if fd_limit:  # the participant's `ulimit -n`
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, hard))
    gateway = Gateway(LocalStore(store_dir)).start()
    print(gateway.url, flush=True)
    for _ in sys.stdin:
        print(json.dumps(gateway.stats() if hasattr(gateway, "stats") else {}), flush=True)
    started = time.perf_counter()
    gateway.stop()
    print(json.dumps({"stop_s": round(time.perf_counter() - started, 3)}), flush=True)


# --- the attacker process -------------------------------------------------------------------


def attack(mode: str, url: str, count: int, peers: int) -> None:
    """Hold `count` attacking connections until stdin closes, re-opening any the server closes;
    print 'ready <seconds to connect them all>' once they are up, and a summary at the end."""
    raise_fd_limit()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    target = (host, int(port))
    header = b"GET /ipfs/x HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: a\r\n" * 1000

    def open_one(i: int, wait: bool = False) -> socket.socket:
        s = socket.socket()
        s.bind((source_for(1 + i % peers), 0))
        if wait:  # the first time: connect, given 1 s (one that fails is left out)
            s.settimeout(1)
            try:
                s.connect(target)
            except OSError:
                s.close()
                raise
        s.setblocking(False)
        if not wait:  # re-opening: fire and forget
            s.connect_ex(target)
        return s

    started = time.perf_counter()
    conns = []
    for i in range(count):
        with contextlib.suppress(OSError):
            conns.append(open_one(i, wait=True))
    print(f"ready {time.perf_counter() - started:.3f} {len(conns)}", flush=True)
    slot = {s.fileno(): i for i, s in enumerate(conns)}
    sent = [0] * len(conns)
    closed = 0
    next_drip = time.perf_counter()
    while not select.select([sys.stdin], [], [], 0)[0]:
        watch = select.poll()
        for s in conns:
            if s.fileno() in slot:
                watch.register(s, select.POLLIN)
        for fd, _ in watch.poll(50):  # the server closed it (or answered it)
            i = slot.pop(fd)
            s = conns[i]
            try:
                if s.recv(65536):
                    slot[fd] = i
                    continue
            except OSError:
                pass
            s.close()
            closed += 1
            if mode != "idle":  # a plain flood keeps what it still has; the others re-open
                conns[i], sent[i] = open_one(i), 0
                slot[conns[i].fileno()] = i
        if mode == "slowloris" and time.perf_counter() >= next_drip:
            next_drip += DRIP_SECONDS
            for i, s in enumerate(conns):
                with contextlib.suppress(OSError):
                    sent[i] += s.send(header[sent[i] : sent[i] + 1])
    print(json.dumps({"closed_by_gateway": closed}), flush=True)
    for s in conns:
        s.close()


# --- the honest client (this process) -------------------------------------------------------


def fetch_times(
    url: str, cid: str, expected: bytes, fetches: int, interval: float
) -> tuple[list[float], int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    times, failures = [], 0
    next_start = time.perf_counter()
    for _ in range(fetches):
        time.sleep(max(0.0, next_start - time.perf_counter()))
        next_start += interval
        started = time.perf_counter()
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", f"/ipfs/{cid}")
            body = conn.getresponse().read()
            conn.close()
            if hashlib.sha256(body).digest() != expected:
                raise ValueError("wrong bytes")
            times.append(time.perf_counter() - started)
        except (OSError, http.client.HTTPException, ValueError):
            failures += 1
    return times, failures


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 4)


def scenario(
    name: str, store: Path, cid: str, digest: bytes, args: argparse.Namespace, attacker: list[str]
) -> dict[str, object]:
    me = [sys.executable, __file__]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True, "env": env}
    gateway = subprocess.Popen([*me, "_serve", str(store), str(args.fd_limit)], **pipes)  # type: ignore[call-overload]
    assert gateway.stdin and gateway.stdout
    url = gateway.stdout.readline().strip()
    row: dict[str, object] = {"scenario": name}
    bad = None
    if attacker:
        bad = subprocess.Popen([*me, "_attack", *attacker[:1], url, *attacker[1:]], **pipes)  # type: ignore[call-overload]
        assert bad.stdout
        _, seconds, connected = bad.stdout.readline().split()
        row["attack"] = {"mode": attacker[0], "connections": int(attacker[1]),
                         "peers": int(attacker[2]), "connected_s": float(seconds),
                         "connected": int(connected)}  # fmt: skip
        time.sleep(1.0)  # let the gateway settle what the attack started
    times, failures = fetch_times(url, cid, digest, args.fetches, args.interval)
    row |= {
        "fetches": args.fetches,
        "failed": failures,
        "p50_s": percentile(times, 0.5),
        "p95_s": percentile(times, 0.95),
        "max_s": round(max(times), 4) if times else None,
    }
    gateway.stdin.write("stats\n")  # counted while the attack still runs
    gateway.stdin.flush()
    row["gateway"] = json.loads(gateway.stdout.readline())
    if bad is not None:
        assert bad.stdin and bad.stdout
        bad.stdin.close()
        row["attack"] |= json.loads(bad.stdout.readline())  # type: ignore[operator]
        bad.wait(30)
    gateway.stdin.close()
    row["gateway"] |= json.loads(gateway.stdout.readline())  # type: ignore[operator]
    gateway.wait(30)
    print(json.dumps(row), flush=True)
    return row


def gateway_module() -> str:
    """Which covey.store.gateway was measured (the checkout's, or another on PYTHONPATH)."""
    import covey.store.gateway

    path = Path(covey.store.gateway.__file__).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fetches", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between fetch starts")
    parser.add_argument("--blob-mb", type=float, default=2.0)
    parser.add_argument("--idle", type=int, default=500, help="idle connections the attacker holds")
    parser.add_argument("--peers", type=int, default=50, help="addresses they come from (2nd run)")
    parser.add_argument("--slowloris", type=int, default=100, help="slowloris clients, 1 per peer")
    parser.add_argument(
        "--fd-limit", type=int, default=0, help="the gateway's `ulimit -n` (0: as inherited)"
    )
    parser.add_argument("--label", default="new", help="which server this measures")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gateway.json"))
    args = parser.parse_args()
    raise_fd_limit()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        data = os.urandom(int(args.blob_mb * 1e6))
        digest = hashlib.sha256(data).digest()
        from covey.store.local import LocalStore

        cid = LocalStore(store).put(data)
        rows = [
            scenario("quiet", store, cid, digest, args, []),
            scenario(f"{args.idle} idle, 1 peer", store, cid, digest, args,
                     ["idle", str(args.idle), "1"]),
            scenario(f"{args.idle} idle, {args.peers} peers", store, cid, digest, args,
                     ["idle", str(args.idle), str(args.peers)]),
            scenario(f"{args.idle} idle, 1 peer, re-opened", store, cid, digest, args,
                     ["reopen", str(args.idle), "1"]),
            scenario(f"{args.idle} idle, {args.peers} peers, re-opened", store, cid, digest, args,
                     ["reopen", str(args.idle), str(args.peers)]),
            scenario(f"{args.slowloris} slowloris", store, cid, digest, args,
                     ["slowloris", str(args.slowloris), str(args.slowloris)]),
        ]  # fmt: skip
    try:
        waitress = version("waitress")
    except PackageNotFoundError:
        waitress = None
    result = {
        "command": ".venv/bin/python benchmarks/bench_gateway.py " + shlex.join(sys.argv[1:]),
        "server": args.label,
        "gateway_module": gateway_module(),
        "setup": f"gateway, attacker and honest client in 3 processes on loopback; "
        f"{args.fetches} fetches of a {args.blob_mb} MB blob, one every {args.interval} s (or"
        " when the last ends), each on a fresh connection, re-hashed, 10 s timeout, from 1 s"
        " after the attacker's connections are up; the attacker re-opens what the gateway"
        " closes",
        "gateway_fd_limit": args.fd_limit or resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "results": rows,
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}),"
        f" shared",
        "versions": {"waitress": waitress},
        "wall_s": round(time.perf_counter() - started, 1),
        "python": platform.python_version(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_serve"]:
        serve(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["_attack"]:
        attack(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
