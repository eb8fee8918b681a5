"""FedLD (Zeng et al., *Tackling Data Heterogeneity in Federated Learning via Loss Decomposition*, MICCAI
2024) and its two ablations.

* :class:`FedLD`: clients train with ``CE + margin_lambda * log(1 + ||softmax(logits)||_F^2)`` (margin
  control, ``margin-lambda`` in the config); the server applies ``w <- w + g`` with ``g`` FedLD's
  principal-gradient aggregation of the deltas (:class:`PrincipalGradients`, server lr 1 as the official
  code), and logs its size and angle against FedAvg's update on the same deltas every round;
* :class:`FedLDMarginOnly`: margin control with FedAvg aggregation;
* :class:`FedLDAggregationOnly`: principal-gradient aggregation with plain cross-entropy clients.

Decisions on the official code's quirks (brief section 1.6): no hidden learning-rate warm-up (the client lr
is the configured lr from round 1); no "plain mean in the first round" special case (the official code takes
the plain mean while its EMA history is empty, i.e. in its first round, where its warm-up's lr of 0 leaves
only the BatchNorm statistics moving; without the warm-up, the principal-gradient aggregation applies from
the first round); full or partial participation both work, as ``m`` is the number of replies.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from robustlab.fedld.strategies.aggregators import FlowerMean, PrincipalGradients
from robustlab.fedld.strategies.base import DeltaStrategy


def _check_margin(margin_lambda: float) -> float:
    if margin_lambda < 0:
        raise ValueError(f"margin_lambda must be >= 0, got {margin_lambda}")
    return float(margin_lambda)


class FedLD(DeltaStrategy):
    """FedLD: margin-control clients + principal-gradient aggregation (see the module docstring)."""

    def __init__(
        self,
        *,
        k_proportion: float = 0.8,
        margin_lambda: float = 0.1,
        diagnostic_keys: Collection[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.principal_gradients = PrincipalGradients(k_proportion, diagnostic_keys)
        super().__init__(self.principal_gradients, **kwargs)
        self.margin_lambda = _check_margin(margin_lambda)

    @property
    def k_proportion(self) -> float:
        return self.principal_gradients.k_proportion

    def client_config(self) -> dict[str, Any]:
        return {**super().client_config(), "margin-lambda": self.margin_lambda}


class FedLDAggregationOnly(FedLD):
    """Ablation: FedLD's principal-gradient aggregation with plain cross-entropy clients."""

    def __init__(self, *, k_proportion: float = 0.8, **kwargs: Any) -> None:
        kwargs.pop("margin_lambda", None)
        super().__init__(k_proportion=k_proportion, margin_lambda=0.0, **kwargs)


class FedLDMarginOnly(DeltaStrategy):
    """Ablation: FedLD's margin-control local loss with FedAvg aggregation (:class:`FlowerMean`)."""

    def __init__(self, *, margin_lambda: float = 0.1, **kwargs: Any) -> None:
        super().__init__(FlowerMean(), **kwargs)
        self.margin_lambda = _check_margin(margin_lambda)

    def client_config(self) -> dict[str, Any]:
        return {**super().client_config(), "margin-lambda": self.margin_lambda}
