"""Compile the Vyper contracts into artifacts.json, so that running Covey needs no compiler.

    .venv/bin/python -m covey.flock.contracts.build          # rewrite artifacts.json
    .venv/bin/python -m covey.flock.contracts.build --check  # exit 1 if it is stale

artifacts.json holds, per contract, the ABI, the deployment bytecode and the sha256 of the
source it came from, plus the compiler version. The chain client reads only that file; a test
recompiles the sources and compares, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE / "artifacts.json"
CONTRACTS = ("Token", "FlockTask")
VYPER_VERSION = "0.4.3"


def source_sha256(name: str) -> str:
    """sha256 of a contract's source bytes, to tell which source an artifact came from."""
    return hashlib.sha256((HERE / f"{name}.vy").read_bytes()).hexdigest()


def compile_contracts() -> dict[str, Any]:
    """Compile every contract with the installed `vyper`; the result is what artifacts.json holds.

    The search path is this folder only (not sys.path), so the output depends on the sources and
    the compiler version alone.
    """
    import vyper  # type: ignore[import-untyped]
    from vyper.cli.vyper_compile import compile_files  # type: ignore[import-untyped]

    if vyper.__version__ != VYPER_VERSION:
        raise RuntimeError(
            f"vyper {vyper.__version__} is installed; artifacts are built with {VYPER_VERSION}"
            f" (pip install vyper=={VYPER_VERSION})"
        )
    contracts: dict[str, Any] = {}
    for name in CONTRACTS:
        path = HERE / f"{name}.vy"
        out = compile_files(
            [str(path)], ["abi", "bytecode"], paths=[str(HERE)], include_sys_path=False
        )
        (result,) = out.values()
        contracts[name] = {
            "abi": result["abi"],
            "bytecode": result["bytecode"],
            "source_sha256": source_sha256(name),
        }
    return {"compiler": f"vyper {vyper.__version__}", "contracts": contracts}


def render(artifacts: dict[str, Any]) -> str:
    """The exact text written to artifacts.json (stable key order, one trailing newline)."""
    return json.dumps(artifacts, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if artifacts.json is stale")
    args = parser.parse_args(argv)
    text = render(compile_contracts())
    if args.check:
        current = ARTIFACTS.read_text(encoding="utf-8") if ARTIFACTS.exists() else ""
        if current != text:
            print(f"{ARTIFACTS} is stale: run python -m covey.flock.contracts.build")
            return 1
        print(f"{ARTIFACTS} is up to date")
        return 0
    ARTIFACTS.write_text(text, encoding="utf-8")
    print(f"wrote {ARTIFACTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
