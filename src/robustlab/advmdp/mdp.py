"""Finite layered linear MDPs (the brief's section 7): exact instances that satisfy the linear-Q assumption.

Array conventions (used everywhere in :mod:`robustlab.advmdp`):

* ``phi``  ``(H, n, A, d)``  features phi_h(s, a), ``||phi||_2 <= 1``;
* ``mu``   ``(H-1, d, n)``   transition factors, ``P_h(s'|s,a) = sum_i phi_{h,i}(s,a) mu_{h,i}(s')``;
* ``P``    ``(H-1, n, A, n)`` the resulting transitions from layer h to layer h+1;
* ``rho``  ``(n,)``          initial distribution over the states of layer 1;
* losses are ``l_{k,h}(s,a) = phi_h(s,a)^T theta_{k,h}`` with ``theta`` of shape ``(H, d)`` per episode.

Every layer has the same number ``n`` of states; a layered MDP loses no generality this way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from robustlab.errors import UserError

_TOL = 1e-8


@dataclass(frozen=True, eq=False)
class LinearMDP:
    """A finite layered linear MDP. Build it with a constructor; the constructor validates the arrays.

    ``theta_mean`` (optional, ``(H, d)``) is the instance's own mean loss weight, used by the loss
    sequences (:mod:`robustlab.advmdp.losses`) when they need one; ``name`` is for records only.
    """

    phi: np.ndarray
    mu: np.ndarray
    rho: np.ndarray
    theta_mean: np.ndarray | None = None
    name: str = "linear-mdp"
    P: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        phi = np.asarray(self.phi, dtype=float)
        mu = np.asarray(self.mu, dtype=float)
        rho = np.asarray(self.rho, dtype=float)
        if phi.ndim != 4:
            raise UserError(f"phi must have shape (H, n, A, d), got {phi.shape}", "pass a 4-d feature array")
        H, n, A, d = phi.shape
        if min(H, n, A, d) < 1:
            raise UserError(f"phi has an empty axis: shape {phi.shape}", "use H, n, A, d >= 1")
        if mu.shape != (H - 1, d, n):
            raise UserError(
                f"dimension mismatch: mu has shape {mu.shape}, expected (H-1, d, n) = {(H - 1, d, n)}",
                "give mu one (d, n) block per transition between consecutive layers",
            )
        if rho.shape != (n,):
            raise UserError(f"dimension mismatch: rho has shape {rho.shape}, expected ({n},)", "fix rho")
        if not (np.all(np.isfinite(phi)) and np.all(np.isfinite(mu)) and np.all(np.isfinite(rho))):
            raise UserError("phi, mu or rho contains NaN or inf", "pass finite arrays")
        norms = np.linalg.norm(phi, axis=-1)
        if norms.max() > 1 + 1e-6:
            raise UserError(
                f"features must satisfy ||phi(s,a)||_2 <= 1, found {norms.max():.4g}", "rescale phi"
            )
        if rho.min() < -_TOL or abs(rho.sum() - 1) > 1e-6:
            raise UserError("rho is not a probability distribution", "make rho nonnegative and sum to 1")
        P = np.einsum("hsad,hdt->hsat", phi[:-1], mu)
        if P.size and (P.min() < -1e-7 or np.abs(P.sum(-1) - 1).max() > 1e-6):
            raise UserError(
                "P is not stochastic: P_h(.|s,a) = phi(s,a)^T mu_h must be nonnegative and sum to 1 "
                f"(min {P.min():.3g}, worst row sum {P.sum(-1).flat[np.abs(P.sum(-1) - 1).argmax()]:.6g})",
                "fix mu (or phi) so that every row of P is a distribution",
            )
        P = np.clip(P, 0.0, None)
        P /= np.where(P.sum(-1, keepdims=True) > 0, P.sum(-1, keepdims=True), 1.0)
        if self.theta_mean is not None:
            tm = np.asarray(self.theta_mean, dtype=float)
            if tm.shape != (H, d):
                raise UserError(f"dimension mismatch: theta_mean has shape {tm.shape}, expected {(H, d)}")
            object.__setattr__(self, "theta_mean", tm)
        object.__setattr__(self, "phi", phi)
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "rho", rho / rho.sum())
        object.__setattr__(self, "P", P)

    # ------------------------------------------------------------------ shape helpers
    @property
    def H(self) -> int:
        return self.phi.shape[0]

    @property
    def n_states(self) -> int:
        return self.phi.shape[1]

    @property
    def n_actions(self) -> int:
        return self.phi.shape[2]

    @property
    def dim(self) -> int:
        return self.phi.shape[3]

    def loss_table(self, theta: np.ndarray) -> np.ndarray:
        """``l_h(s,a) = phi_h(s,a)^T theta_h`` for ``theta`` of shape ``(..., H, d)`` -> ``(..., H, n, A)``."""
        return np.einsum("hsad,...hd->...hsa", self.phi, np.asarray(theta, dtype=float))

    def check_theta(self, theta: np.ndarray, what: str = "losses") -> None:
        """Raise ``UserError`` unless ``theta`` has shape ``(..., H, d)`` and all losses lie in [0, 1]."""
        theta = np.asarray(theta, dtype=float)
        if theta.shape[-2:] != (self.H, self.dim):
            raise UserError(
                f"dimension mismatch: {what} have theta shape {theta.shape}, expected (..., {self.H}, {self.dim})",
                "give one d-vector per layer",
            )
        flat = theta.reshape(-1, self.H, self.dim)
        lo, hi = np.inf, -np.inf
        for start in range(0, flat.shape[0], 4096):
            table = self.loss_table(flat[start : start + 4096])
            lo, hi = min(lo, table.min()), max(hi, table.max())
        if lo < -1e-9 or hi > 1 + 1e-9:
            raise UserError(f"{what} must lie in [0, 1], found range [{lo:.4g}, {hi:.4g}]", "rescale theta")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def random(
        cls,
        horizon: int,
        n_states: int,
        n_actions: int,
        dim: int,
        seed: int = 0,
        alpha_phi: float = 1.0,
        alpha_mu: float = 1.0,
    ) -> LinearMDP:
        """A random linear MDP: phi ~ Dirichlet(alpha_phi), mu_{h,i} ~ Dirichlet(alpha_mu) over next states.

        The initial distribution is spread uniformly over all ``n_states`` first-layer states (the brief's
        pitfall 7.4: a single start state makes Sigma_1 rank-deficient when A < d). ``theta_mean`` is drawn
        uniformly from [0, 1]^(H x d).
        """
        for name, v in (("horizon", horizon), ("n_states", n_states), ("n_actions", n_actions), ("dim", dim)):
            if int(v) < 1:
                raise UserError(f"{name} must be >= 1, got {v}", f"pass a positive {name}")
        if alpha_phi <= 0 or alpha_mu <= 0:
            raise UserError("Dirichlet concentrations must be > 0", "pass alpha_phi, alpha_mu > 0")
        rng = np.random.default_rng([int(seed), 11])
        phi = rng.dirichlet(np.full(dim, alpha_phi), size=(horizon, n_states, n_actions))
        mu = rng.dirichlet(np.full(n_states, alpha_mu), size=(horizon - 1, dim))
        rho = np.full(n_states, 1.0 / n_states)
        theta_mean = rng.random((horizon, dim))
        return cls(
            phi,
            mu,
            rho,
            theta_mean,
            name=f"random(H={horizon},n={n_states},A={n_actions},d={dim},seed={seed})",
        )

    @classmethod
    def tabular(cls, P: np.ndarray, rho: np.ndarray, name: str = "tabular") -> LinearMDP:
        """The tabular special case: d = n*A, phi = one-hot of (s, a), mu_{(s,a)} = P(.|s,a).

        ``P`` has shape ``(H-1, n, A, n)``; a horizon-1 MDP is given by ``P`` of shape ``(0, n, A, n)``.
        """
        P = np.asarray(P, dtype=float)
        if P.ndim != 4 or P.shape[1] != P.shape[3]:
            raise UserError(f"P must have shape (H-1, n, A, n), got {P.shape}", "fix P")
        Hm1, n, A, _ = P.shape
        d = n * A
        phi = np.broadcast_to(np.eye(d).reshape(1, n, A, d), (Hm1 + 1, n, A, d)).copy()
        mu = P.reshape(Hm1, d, n)
        return cls(phi, mu, np.asarray(rho, dtype=float), name=name)

    @classmethod
    def combination_lock(cls, horizon: int = 6, n_actions: int = 4, seed: int = 0) -> LinearMDP:
        """Hard-exploration instance (brief 7.2): latent z in {good, bad}, one-hot features over (z, a).

        State 0 of each layer is ``good``, state 1 is ``bad``; the start is ``good``. At layer h only the
        secret action a*_h keeps good -> good; every other action sends good -> bad; bad is absorbing.
        ``theta_mean``: loss 1 everywhere except 0 on the good state of the last layer, so the optimal
        policy pays H-1 per episode and a uniform policy pays about H (it reaches the cheap end with
        probability A^-(H-1)). Intermediate losses carry no signal about the lock.
        """
        if horizon < 2 or n_actions < 2:
            raise UserError("combination lock needs horizon >= 2 and n_actions >= 2", "increase them")
        rng = np.random.default_rng([int(seed), 13])
        secret = rng.integers(0, n_actions, size=horizon)
        n, A, H = 2, n_actions, horizon
        P = np.zeros((H - 1, n, A, n))
        for h in range(H - 1):
            P[h, 1, :, 1] = 1.0
            P[h, 0, :, 1] = 1.0
            P[h, 0, secret[h], :] = (1.0, 0.0)
        mdp = cls.tabular(P, np.array([1.0, 0.0]), name=f"lock(H={H},A={A},seed={seed})")
        theta = np.ones((H, n * A))
        theta[H - 1, :A] = 0.0  # good state of the last layer (features index s*A + a)
        return cls(mdp.phi, mdp.mu, mdp.rho, theta, name=mdp.name)

    # ------------------------------------------------------------------ transforms
    def with_signed_features(self, seed: int = 0) -> tuple[LinearMDP, np.ndarray]:
        """Apply an invertible map T: phi -> T phi / c, mu -> c T^-T mu (brief 7.1, non-simplex features).

        Returns the new MDP and the d x d matrix ``M = c T^-T`` that maps loss weights: ``theta' = M theta``
        (apply it as ``theta @ M.T``). Transitions and all losses / Q-values are unchanged; features become
        signed. ``c`` is the largest ``||T phi||`` so that the new features still have norm <= 1.
        """
        rng = np.random.default_rng([int(seed), 17])
        d = self.dim
        while True:
            T = rng.normal(size=(d, d))
            if np.linalg.cond(T) < 50:
                break
        tphi = self.phi @ T.T
        c = float(np.linalg.norm(tphi, axis=-1).max())
        M = c * np.linalg.inv(T).T
        mu = np.einsum("ij,hjt->hit", M, self.mu)
        tm = None if self.theta_mean is None else self.theta_mean @ M.T
        return LinearMDP(tphi / c, mu, self.rho, tm, name=self.name + "+signed"), M
