"""robustlab: Antidote, FedLD and refined-regret adversarial linear MDPs as tools."""

__version__ = "0.1.0"
