"""SCAFFOLD (Karimireddy et al., ICML 2020), option II control variates."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from robustlab.fedld.protocol import PARTITION_ID, SCAFFOLD_ACCEPTED, SCAFFOLD_C, SCAFFOLD_DC, NDict
from robustlab.fedld.strategies.aggregators import DeltaMean
from robustlab.fedld.strategies.base import DeltaStrategy, arrays_of, metric_dict


class Scaffold(DeltaStrategy):
    """SCAFFOLD, option II: ``w <- w + server_lr * sum_i p_i Delta_i`` (:class:`DeltaMean`) and
    ``c <- c + (|S| / N) * mean_i Delta c_i`` with N = ``expected_nodes`` (every client), so that
    ``c = mean_i c_i`` over all N clients at all times.

    The server control variate ``c`` (one entry per trainable parameter, named like the model's parameters)
    travels inside the arrays record under the prefix ``scaffold-c::``; each client keeps its own ``c_i`` in
    ``context.state``, corrects every local step by ``c - c_i`` and returns ``Delta c_i`` under the prefix
    ``scaffold-dc::``.

    **Faults.** The invariant needs the server and each client to agree on which ``Delta c_i`` were applied.
    The server applies those of every well-formed reply, also in a round it skips for too few replies (the
    model stays, ``c`` moves with the clients' ``c_i``), and tells the clients, in the next training config
    (``scaffold-accepted-rounds``, one entry per partition: the last round whose change of that client was
    applied). A client keeps its new ``c_i`` as pending and commits it only when the server says it was
    applied; a reply that was dropped (malformed, timed out) leaves ``c_i`` and ``c`` both as they were.
    """

    local_algorithm = "scaffold"
    reply_extra_prefixes = (SCAFFOLD_DC,)
    ACCEPTED = SCAFFOLD_ACCEPTED

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(DeltaMean(weighted=True), **kwargs)
        self.control: NDict = {}
        self.accepted_rounds = np.full(self.expected_nodes, -1, dtype=np.int64)

    def outgoing_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        out = ArrayRecord({k: v for k, v in arrays.items()})
        for k, v in self.control.items():
            out[SCAFFOLD_C + k] = Array(np.asarray(v, order="C"))
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["scaffold-has-control"] = bool(self.control)
        config[self.ACCEPTED] = [int(r) for r in self.accepted_rounds]
        return super().configure_train(server_round, arrays, config, grid)

    def accept_replies(self, server_round: int, replies: list[Message]) -> None:
        """Apply the control-variate changes of every well-formed reply (see Faults above)."""
        from robustlab.fedld.aggregation import scaffold_server_control

        dcs, pids = [], []
        for msg in replies:
            dc = {
                k[len(SCAFFOLD_DC) :]: v.numpy()
                for k, v in arrays_of(msg).items()
                if k.startswith(SCAFFOLD_DC)
            }
            if dc:
                dcs.append(dc)
                pids.append(int(metric_dict(msg).get(PARTITION_ID, -1)))
        if not dcs:
            return
        c = self.control or {k: np.zeros_like(v, dtype=np.float32) for k, v in dcs[0].items()}
        new_c = scaffold_server_control(c, dcs, max(self.expected_nodes, len(dcs)))
        self.control = {k: v.astype(np.float32) for k, v in new_c.items()}
        for pid in pids:
            if 0 <= pid < len(self.accepted_rounds):
                self.accepted_rounds[pid] = server_round

    def state_dict(self) -> NDict:
        return {**{SCAFFOLD_C + k: v for k, v in self.control.items()}, self.ACCEPTED: self.accepted_rounds}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.control = {
            k[len(SCAFFOLD_C) :]: np.asarray(v, np.float32)
            for k, v in state.items()
            if k.startswith(SCAFFOLD_C)
        }
        if self.ACCEPTED in state:  # checkpoints written before the acceptance protocol lack it
            self.accepted_rounds = np.asarray(state[self.ACCEPTED], dtype=np.int64).copy()
