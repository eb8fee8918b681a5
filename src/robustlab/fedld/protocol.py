"""The message protocol between the FedLD ServerApp (strategies) and ClientApp: record names, metric and
config keys, and the extra entries some methods put next to the model in the arrays record. Both apps
import these names from here, so the two sides cannot drift apart.

Payload layout (Flower Message API, one ``RecordDict`` per message):

* server -> client (train and evaluate): ``"arrays"`` (``ArrayRecord``: every ``state_dict`` entry of the
  global model under its own name, plus the method's extras below) and ``"config"`` (``ConfigRecord``: the
  task ``task-*``, the local algorithm and its hyper-parameters, ``server-round``);
* client -> server, train: ``"arrays"`` (the client's whole model after training, plus extras) and
  ``"metrics"`` (``MetricRecord``: ``num-examples``, ``train-loss``, ``local-steps``, ``partition-id``);
* client -> server, evaluate: ``"metrics"`` only (accuracy, loss, per-class counts, ``partition-id``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"

NUM_EXAMPLES = "num-examples"  #: the aggregation weight every training reply carries
PARTITION_ID = "partition-id"  #: the client's partition: fixes the aggregation order, keys per-client state

SCAFFOLD_C = "scaffold-c::"  # server -> client: server control variate entries (model key after it)
SCAFFOLD_DC = "scaffold-dc::"  # client -> server: control-variate change c_i+ - c_i
SCAFFOLD_ACCEPTED = "scaffold-accepted-rounds"  # config: per partition, last round whose change was applied
PENDING_ROUND = "__round__"  # client state: the round that produced a pending c_i

FEDPAC = "fedpac::"  # FedPAC's extra entries inside the arrays records (both directions)
FEDPAC_HEAD = FEDPAC + "head::"  # server -> client: this client's personalised head (model key after it)
FEDPAC_GLOBAL_PROTO = FEDPAC + "global-proto"  # server -> client: (C, d) global class prototypes
FEDPAC_GLOBAL_COUNT = FEDPAC + "global-proto-count"  # server -> client: (C,) samples behind each prototype
FEDPAC_V = FEDPAC + "v"  # client -> server: (1,) feature variance term v_i
FEDPAC_H = FEDPAC + "h"  # client -> server: (C, d) h_i[k] = p_ik * mean feature of class k
FEDPAC_PROTO = FEDPAC + "proto"  # client -> server: (C, d) local class prototypes after training
FEDPAC_COUNT = FEDPAC + "proto-count"  # client -> server: (C,) class counts (0 = class absent)

NDict = dict[str, np.ndarray]


def arrays_to_numpy(record: ArrayRecord) -> NDict:
    """An ``ArrayRecord`` as ``{name: ndarray}`` (copies)."""
    return {k: np.array(v.numpy(), copy=True) for k, v in record.items()}


def numpy_to_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``{name: ndarray}`` as an ``ArrayRecord`` (order kept)."""
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})
