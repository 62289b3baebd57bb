"""The keys of Covey's Flower messages, defined once for the ServerApp and the ClientApp.

Every message carries a ConfigRecord named `META` with Covey's fields (snake_case). Train
messages also carry an adapter as an ArrayRecord (`codec`): the global one to the client
(`GLOBAL`), the trained one back (`UPDATE`, with the training metrics in `METRICS`).

| message     | direction        | records: fields                                              |
|-------------|------------------|--------------------------------------------------------------|
| query       | server -> client | META: RECIPE                                                 |
| query reply | client -> server | META: CLIENT_INDEX, NUM_EXAMPLES                             |
| train       | server -> client | GLOBAL; META: ROUND, CLIENT_INDEX, RECIPE, WIRE_DTYPE, ATTACK |
| train reply | client -> server | UPDATE; METRICS; META: CLIENT_INDEX, NUM_SAMPLES             |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.app import ConfigRecord

# Records of a message's RecordDict
META = "covey"
"""ConfigRecord with Covey's fields, in every message."""
GLOBAL = "global"
"""ArrayRecord: the global adapter (server -> client)."""
UPDATE = "update"
"""ArrayRecord: the trained adapter (client -> server)."""
METRICS = "metrics"
"""MetricRecord: the local training metrics (client -> server)."""

# Fields of META
RECIPE = "recipe"
"""The run's resolved recipe as TOML text: a SuperNode needs no recipe of its own."""
ROUND = "round"
"""The round being trained (it seeds the client's training)."""
CLIENT_INDEX = "client_index"
"""Which client: the server's choice in a train message, the node's answer in a reply."""
WIRE_DTYPE = "wire_dtype"
"""The float dtype of adapters in transit (`covey.fed.transport.FLOAT_DTYPES`)."""
ATTACK = "attack"
"""A robustness experiment's update attack for this client ("" for an honest client)."""
NUM_EXAMPLES = "num_examples"
"""Records the client holds (query reply)."""
NUM_SAMPLES = "num_samples"
"""Examples the client trained on (train reply), clamped by the server's validation."""


def meta_int(record: ConfigRecord, key: str) -> int:
    """An integer field of a ConfigRecord (bool is not an integer here)."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"field {key!r} must be an integer, got {value!r}")
    return value
