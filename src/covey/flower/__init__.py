"""Covey on Flower: the engine's round loop as a Flower app, for runs across machines.

- `server_app`: the ServerApp (selection, validation, aggregation, evaluation, checkpoints, as
  `covey.fed.engine`); `client_app`: the ClientApp (one SuperNode = one client, `train_local`).
- `codec`: adapters <-> Flower ArrayRecords in float32, float16 or bfloat16.
- `run`: start and stop SuperLink/SuperNodes, submit runs, certificates; `covey flower ...`.
- `app/pyproject.toml`: the Flower App that `flwr run` bundles (it names the two apps above).

Everything here but `run` imports Flower (`pip install 'covey[flower]'`); `run` imports it only
when a command needs it, so the `covey` CLI loads without Flower.
"""
