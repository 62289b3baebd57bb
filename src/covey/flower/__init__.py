"""Covey on Flower: the engine's round loop as a Flower app, for runs across machines.

- `server_app`: the ServerApp (selection, validation, aggregation, evaluation, checkpoints, as
  `covey.fed.engine`); `client_app`: the ClientApp (one SuperNode = one client, `train_local`).
- `codec`: adapters <-> Flower ArrayRecords in float32, float16 or bfloat16.
- `wire`: the keys of the messages between ServerApp and ClientApp, defined once.
- `settings`: the run config (`FlowerSettings`), each key's default and meaning defined once.
- `processes`: Flower's processes as Covey starts them (environment, logs, stopping).
- `certs`: TLS certificates for the SuperLink, key pairs for SuperNode authentication.
- `control`: the `flwr` CLI: connection, submitting a run and waiting for it, registering keys.
- `deploy`: SuperLink, SuperNodes, a whole federation on one machine, the simulation runtime.
- `cli`: the `covey flower` commands.
- `app/pyproject.toml`: the Flower App that `flwr run` bundles (it names the two apps above).

`server_app` and `client_app` import Flower (`pip install 'covey[flower]'`), `codec` when it
runs; the others only start Flower's processes, so the `covey` CLI loads without Flower.
"""
