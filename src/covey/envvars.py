"""The environment variables that hold Covey's secrets, named once.

Secrets come from the environment (or a file), never from a flag, which would land in shell
history and `ps`. The names live here, at the bottom of the layers, because code that reads a
secret (`covey.flock.keys`, `covey.serve`) and code that must keep all of them from child
processes (`covey.flower.processes`) sit in different layers.
"""

from __future__ import annotations

PRIVATE_KEY_ENV = "COVEY_PRIVATE_KEY"
"""A FLock participant's Ethereum private key (hex), when no --key-file is given."""
SERVE_AUTH_ENV = "COVEY_SERVE_AUTH"
"""`user:password`: `covey serve` requires this login when it is set."""
SECRET_ENV_NAMES = (PRIVATE_KEY_ENV, SERVE_AUTH_ENV)
"""Every variable above: no Flower process gets them (`covey.flower.processes.flower_env`)."""
