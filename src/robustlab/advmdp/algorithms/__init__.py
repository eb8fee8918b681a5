"""Algorithms: Alg 1, Alg 2 (MR-unbiased, MR-clip), Alg 3, Luo et al. 2021 and the references."""

from robustlab.advmdp.algorithms.engine import MODES, RunResult, run_algorithm
from robustlab.advmdp.algorithms.specs import (
    ALGORITHM_NAMES,
    ALGORITHMS,
    AlgorithmSpec,
    Params,
    get_spec,
    with_constants,
)

__all__ = [
    "ALGORITHMS",
    "ALGORITHM_NAMES",
    "MODES",
    "AlgorithmSpec",
    "Params",
    "RunResult",
    "get_spec",
    "run_algorithm",
    "with_constants",
]
