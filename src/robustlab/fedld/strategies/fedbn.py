"""FedBN (Li et al., ICLR 2021): BatchNorm parameters and statistics stay on the clients."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from robustlab.fedld.strategies.aggregators import FlowerMean
from robustlab.fedld.strategies.base import DeltaStrategy


class FedBN(DeltaStrategy):
    """FedBN: ``local_keys`` (the model's BatchNorm entries) stay on the clients, which keep their own values
    in ``context.state`` and ignore the server's. The server still averages them (:class:`FlowerMean`) into its
    copy, used only for the server-side evaluation of "the" global model; FedBN's own number is the
    client-side evaluation with local BatchNorm (``client-accuracy``), reported in a table of its own.
    """

    def __init__(self, *, local_keys: Collection[str], **kwargs: Any) -> None:
        super().__init__(FlowerMean(), **kwargs)
        self.local_keys = sorted(local_keys)
        if not self.local_keys:
            raise ValueError("FedBN needs the model's BatchNorm keys (local_keys); the model has none")

    def client_config(self) -> dict[str, Any]:
        return {**super().client_config(), "local-keys": list(self.local_keys)}

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["local-keys"] = list(self.local_keys)
        return super().configure_evaluate(server_round, arrays, config, grid)
