"""Refined regret for adversarial MDPs with linear function approximation (Dai, Luo, Wei, Zimmert, ICML 2023)."""
