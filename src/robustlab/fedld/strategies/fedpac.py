"""FedPAC (Xu, Tong & Huang, ICLR 2023): feature alignment and personalised classifier combination, as the
official FedLD repository runs it. Scored on the clients' own models (global body + personal head)."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from robustlab.fedld.protocol import (
    FEDPAC,
    FEDPAC_COUNT,
    FEDPAC_GLOBAL_COUNT,
    FEDPAC_GLOBAL_PROTO,
    FEDPAC_H,
    FEDPAC_HEAD,
    FEDPAC_PROTO,
    FEDPAC_V,
    NDict,
)
from robustlab.fedld.strategies.base import Aggregator, ClientUpdates, DeltaStrategy


class ModelMean(Aggregator):
    """FedPAC's global arrays: the sample-weighted mean of the client models in float64 (the official
    ``average_weights_weighted``), ``sum_i p_i w_i`` over the global model's entries."""

    description = "sample-weighted mean of the client models (float64)"

    def new_global(self, clients: ClientUpdates, server_lr: float) -> NDict:
        from robustlab.fedld.aggregation import mean_delta

        if server_lr != 1.0:
            raise ValueError("FedPAC replaces the model by the clients' mean: the server lr must be 1")
        self.diagnostics = {}
        g = clients.global_arrays
        return mean_delta([{k: m[k] for k in g} for m in clients.models], clients.weights)


class FedPAC(DeltaStrategy):
    """FedPAC (Xu, Tong & Huang, ICLR 2023), as the official FedLD repo runs it (``methods/fedpac.py``,
    ``running.py`` ``train_round_fedpac``, ``tools.py``): feature alignment to global class prototypes on the
    clients, and a personalised classifier head per client, combined on the server from the heads of the
    clients whose features look alike.

    **Client** (``local-algorithm = fedpac``, :func:`robustlab.fedld.client_app.fedpac_local_train`): starts
    from the global body and its own head; computes its statistics (v_i, h_i) and class prototypes on the
    starting model; trains the head alone (body frozen) for ``head_epochs`` epoch(s) at ``head_lr`` (the
    official code's hard-coded ``epoch_classifier = 1``, ``lr_g = 0.1``), then the body alone (head frozen)
    for the configured local epochs at the configured lr with ``CE + lam * MSE(z, prototype of y)``
    (:func:`robustlab.fedld.losses.fedpac_alignment_loss`; no alignment before the server has
    prototypes, i.e. in the first round, as the official ``round > 0``); returns its whole model plus
    ``fedpac::v``, ``fedpac::h``, its prototypes after training and its class counts.

    **Server** (:class:`ModelMean`, :meth:`after_update`): the new global arrays are the sample-weighted mean of the client
    models (the official ``average_weights_weighted``; clients use only its body, every entry outside
    ``head_keys``, BatchNorm statistics included); the global prototypes are the class-count-weighted mean
    of the clients' prototypes (``protos_aggregation``; they replace the previous ones); client i's new
    head is ``sum_j alpha_ij head_j / sum_j alpha_ij`` over this round's trained heads, with alpha_i from
    :func:`robustlab.fedld.aggregation.fedpac_head_weights` on the statistics the clients computed before
    training (as the official code), or its own trained head when that QP has no PSD form (``None``).

    **Where the heads live.** As in the official code (each client object keeps its local model), the
    clients own their heads: ``context.state["fedpac-head"]``, also written to ``client-state-dir``. The
    server only relays the combination: it keeps each client's new head under the node id its reply came
    from (``personal_heads``, valid within one Flower run) and sends it with that node's next messages
    (``fedpac::head::<key>``): this round's evaluation message (the client evaluates with it and stores
    it) and the next training message. So a resumed simulation (fresh node ids) continues exactly: the
    clients restore their stored heads, and the strategy state (:meth:`state_dict`) holds the global
    prototypes. A client that never trained starts from the global (averaged) head, where the official code
    would keep the initial one (they differ only with partial participation).

    **Evaluation.** Client-side evaluation uses each client's own head on the global body (FedPAC's
    number: ``client-accuracy``); the server-side evaluation of "the" global model uses the averaged model
    (global body + sample-weighted mean of the trained heads), which no client uses, as a reference only.

    ``last_diagnostics``: ``fedpac-self-weight`` (mean over clients of the weight of its own head),
    ``fedpac-collaborators`` (mean number of heads with non-zero weight), ``fedpac-qp-fallbacks`` (clients
    that kept their own head) and ``fedpac-variance`` (mean v_i).
    """

    local_algorithm = "fedpac"
    reply_extra_prefixes = (FEDPAC,)

    def __init__(
        self,
        *,
        lam: float = 1.0,
        head_keys: Collection[str] = ("head.weight", "head.bias"),
        head_lr: float = 0.1,
        head_epochs: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(ModelMean(), **kwargs)
        if not (lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"FedPAC lam must be a finite number >= 0, got {lam}")
        if not (head_lr > 0 and math.isfinite(head_lr)) or int(head_epochs) < 0:
            raise ValueError(f"FedPAC needs head_lr > 0 and head_epochs >= 0, got {head_lr}, {head_epochs}")
        self.head_keys = list(head_keys)
        if not self.head_keys:
            raise ValueError("FedPAC needs the model's classifier-head keys (head_keys)")
        self.lam, self.head_lr, self.head_epochs = float(lam), float(head_lr), int(head_epochs)
        self.global_protos: np.ndarray | None = None
        self.global_proto_counts: np.ndarray | None = None
        self.personal_heads: dict[int, NDict] = {}

    def client_config(self) -> dict[str, Any]:
        return {
            **super().client_config(),
            "fedpac-lambda": self.lam,
            "fedpac-head-keys": list(self.head_keys),
            "fedpac-head-lr": self.head_lr,
            "fedpac-head-epochs": self.head_epochs,
        }

    def outgoing_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        missing = [k for k in self.head_keys if k not in arrays]
        if missing:
            raise ValueError(f"FedPAC head keys {missing} are not entries of the model")
        out = ArrayRecord({k: v for k, v in arrays.items()})
        if self.global_protos is not None and self.global_proto_counts is not None:
            out[FEDPAC_GLOBAL_PROTO] = Array(np.asarray(self.global_protos, order="C"))
            out[FEDPAC_GLOBAL_COUNT] = Array(np.asarray(self.global_proto_counts, order="C"))
        return out

    def _construct_messages(
        self, record: RecordDict, node_ids: list[int], message_type: str
    ) -> list[Message]:
        """One message per node; a node with a personalised head gets it added to its arrays record."""
        messages = []
        for node_id in node_ids:
            content = record
            head = self.personal_heads.get(node_id)
            if head is not None:
                arrays = ArrayRecord(dict(record.array_records[self.arrayrecord_key].items()))
                for k, v in head.items():
                    arrays[FEDPAC_HEAD + k] = Array(np.asarray(v, order="C"))
                config = record.config_records[self.configrecord_key]
                content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node_id))
        return messages

    def after_update(self, server_round: int, clients: ClientUpdates) -> None:
        """Each client's personalised head and the global prototypes from this round's replies."""
        from robustlab.fedld.aggregation import aggregate_prototypes, combine_heads, fedpac_head_weights

        models, nodes = clients.models, clients.node_ids
        # personalised heads from the statistics computed before training and the heads after it
        heads = [{k: m[k] for k in self.head_keys} for m in models]
        alphas = fedpac_head_weights(
            [float(np.ravel(m[FEDPAC_V])[0]) for m in models], [m[FEDPAC_H] for m in models]
        )
        self_weight, collaborators = [], []
        for i, (node, alpha) in enumerate(zip(nodes, alphas, strict=True)):
            if alpha is None:
                self.personal_heads[node] = heads[i]
                self_weight.append(1.0)
                collaborators.append(1.0)
            else:
                self.personal_heads[node] = combine_heads(heads, alpha)
                self_weight.append(float(alpha[i] / alpha.sum()))
                collaborators.append(float(np.count_nonzero(alpha)))
        # global prototypes: per class, the count-weighted mean of the clients' prototypes
        protos, sizes = [], []
        for m in models:
            counts = np.ravel(m[FEDPAC_COUNT])
            present = np.flatnonzero(counts > 0)
            protos.append({int(c): m[FEDPAC_PROTO][c] for c in present})
            sizes.append({int(c): float(counts[c]) for c in present})
        merged = aggregate_prototypes(protos, sizes)
        shape = np.shape(models[0][FEDPAC_PROTO])
        self.global_protos = np.zeros(shape, dtype=np.float64)
        self.global_proto_counts = np.zeros(shape[0], dtype=np.float64)
        for c, proto in merged.items():
            self.global_protos[c] = proto
            self.global_proto_counts[c] = sum(s.get(c, 0.0) for s in sizes)
        self.last_diagnostics.update(
            {
                "fedpac-self-weight": float(np.mean(self_weight)),
                "fedpac-collaborators": float(np.mean(collaborators)),
                "fedpac-qp-fallbacks": float(sum(a is None for a in alphas)),
                "fedpac-variance": float(np.mean([np.ravel(m[FEDPAC_V])[0] for m in models])),
            }
        )

    def state_dict(self) -> NDict:
        if self.global_protos is None or self.global_proto_counts is None:
            return {}
        return {FEDPAC_GLOBAL_PROTO: self.global_protos, FEDPAC_GLOBAL_COUNT: self.global_proto_counts}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        unknown = sorted(set(state) - {FEDPAC_GLOBAL_PROTO, FEDPAC_GLOBAL_COUNT})
        if unknown:
            raise ValueError(f"FedPAC state has unknown entries {unknown}")
        if state:
            self.global_protos = np.asarray(state[FEDPAC_GLOBAL_PROTO], np.float64)
            self.global_proto_counts = np.asarray(state[FEDPAC_GLOBAL_COUNT], np.float64)
        else:
            self.global_protos = self.global_proto_counts = None
