"""Where cells run: local worker processes, or the workers of a Ray cluster (``--ray-address``).

Both give ``concurrent.futures`` futures, so the callers (regret grid, tuning, sweep) keep one loop that
saves each finished cell to the run folder as it arrives (the run folder stays on the driver; workers
only compute). ``ray_address``: ``auto`` (a running cluster found from this machine), ``ray://host:port``
or ``host:port`` of a cluster, or ``local`` to start a private Ray instance on this machine with
``workers`` CPUs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor

from robustlab.errors import UserError


class _RayPool:
    def __init__(self, workers: int, address: str) -> None:
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - ray ships with flwr[simulation]
            raise UserError("--ray-address needs ray", "pip install 'ray[default]'") from exc
        self.ray = ray
        kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        try:
            if address == "local":
                ray.init(num_cpus=workers, **kwargs)
            else:
                ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(
                f"cannot connect to the Ray cluster at {address!r} ({exc})",
                "start it with `ray start --head` or pass --ray-address local",
            ) from exc
        # OMP/BLAS to one thread per task, like the local workers
        self._call = ray.remote(num_cpus=1, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})(_call)

    def submit(self, fn: Callable, *args) -> Future:
        return self._call.remote(fn, *args).future()

    def shutdown(self) -> None:
        self.ray.shutdown()


def _call(fn: Callable, *args):
    return fn(*args)


@contextlib.contextmanager
def cell_pool(workers: int, ray_address: str | None = None) -> Iterator:
    """A pool with ``submit(fn, *args) -> Future``: Ray tasks when ``ray_address`` is given, else
    ``workers`` local processes."""
    if ray_address:
        pool = _RayPool(workers, ray_address)
        try:
            yield pool
        finally:
            pool.shutdown()
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield pool
