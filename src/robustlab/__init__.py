"""robustlab: Antidote, FedLD and refined-regret adversarial linear MDPs as tools."""

__version__ = "0.1.0"

import os as _os

if _os.environ.get("ROBUSTLAB_QUIET") == "1":  # a worker process of a quiet robustlab command
    from robustlab.console import quiet_upstream as _quiet

    _quiet()
