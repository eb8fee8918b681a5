"""FedLD / FedGH aggregation against independent references: the brief's closed form (via an m x d SVD),
a literal transcription of the official ``svd_tools.pcgrad_svd`` / ``pcgrad_hierarchy`` (torch, float64),
hand calculations, invariants, and degenerate inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robustlab.errors import UserError
from robustlab.fedld.aggregation import (
    aggregate_prototypes,
    class_prototypes,
    combine_heads,
    fedpac_head_weights,
    fedpac_statistics,
    gradient_harmonize,
    mean_delta,
    num_principal_directions,
    principal_gradient_aggregate,
    scaffold_control_update,
    scaffold_server_control,
    update_history,
    update_size_ratio,
)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# independent references


def closed_form(G: np.ndarray, k: int) -> np.ndarray:
    """The brief's closed form, from the thin SVD of G (m x d), written directly."""
    m = G.shape[0]
    _, s, vt = np.linalg.svd(G, full_matrices=False)
    lam = s**2
    out = np.zeros(G.shape[1])
    for i in range(m):
        for j in range(min(k, len(s))):  # for d < m the directions beyond rank d have σ_j = 0
            out += np.linalg.norm(G[i]) * np.sign(G[i] @ vt[j]) * lam[j] / lam.sum() * vt[j]
    return out / m


def official_pcgrad_svd(client_num, client_grads, grad_history, k_proportion):
    """Line-by-line transcription of the official ``svd_tools.pcgrad_svd`` (FedLD repo), in float64."""
    client_grads_ = torch.stack(client_grads)
    grads = []
    grad_len = grad_history["grad_len"]
    start = 0
    for key in grad_len:
        g_len = grad_len[key]
        end = start + g_len
        layer_grad_history = grad_history[key]
        client_grads_layer = client_grads_[:, start:end]
        naive_avg_grad = torch.mean(client_grads_layer, dim=0, keepdim=True)
        if layer_grad_history is not None:
            if not torch.all(layer_grad_history == 0):
                hessian = 1 / client_grads_layer.size(0) * client_grads_layer @ client_grads_layer.T
                _u, s, e = torch.svd(hessian)
                v = client_grads_layer.T @ e
                v = v.T
                k = int(len(s) * k_proportion)
                w = v[:k]
                for j in range(k):
                    num_pos = 0
                    num_neg = 0
                    for i in range(client_grads_layer.size(0)):
                        if torch.dot(client_grads_layer[i], w[j]) >= 0:
                            num_pos += 1
                        else:
                            num_neg += 1
                    if num_pos < num_neg:
                        w[j] = -w[j]
                grad_agg = []
                for i in range(client_num):
                    grad_pc = client_grads_layer[i]
                    grad_revise = torch.zeros_like(grad_pc)
                    for j in range(k):
                        grad_revise_j = torch.dot(grad_pc, w[j]) / torch.dot(w[j], w[j]) * w[j]
                        grad_revise_j = (
                            grad_revise_j * s[j] / s.sum() * torch.norm(grad_pc) / torch.norm(grad_revise_j)
                        )
                        grad_revise += grad_revise_j
                    grad_agg.append(grad_revise)
                grad_new = torch.mean(torch.stack(grad_agg), dim=0, keepdim=True)
                grad_new = torch.squeeze(grad_new)
                if g_len == 1:
                    grad_new = torch.squeeze(naive_avg_grad)
                    grad_new = torch.unsqueeze(grad_new, 0)
            else:
                grad_new = torch.squeeze(naive_avg_grad)
                if g_len == 1:
                    grad_new = torch.unsqueeze(torch.squeeze(naive_avg_grad), 0)
            gamma = 0.99
            grad_history[key] = gamma * grad_history[key] + (1 - gamma) * grad_new
            grads.append(grad_new)
        else:
            grad_new = client_grads_[:, start:end].mean(0)
            grad_history[key] = grad_new
            grads.append(grad_new)
        start = end
    return torch.cat(grads), grad_history


def official_pcgrad_hierarchy(client_num, client_grads, grad_history):
    """Line-by-line transcription of the official ``svd_tools.pcgrad_hierarchy`` (FedGH), in float64."""
    eplison = 1e-7
    client_grads_ = torch.stack(client_grads)
    grads = []
    grad_len = grad_history["grad_len"]
    start = 0
    for key in grad_len:
        g_len = grad_len[key]
        end = start + g_len
        layer_grad_history = grad_history[key]
        if layer_grad_history is not None:
            pc_v = layer_grad_history.unsqueeze(0)
            client_grads_layer = client_grads_[:, start:end]
            while True:
                num = client_grads_layer.size(0)
                if num > 2:
                    inner_prod = torch.mul(client_grads_layer, pc_v).sum(1)
                    project = inner_prod / (pc_v**2).sum().sqrt()
                    _, ind = project.sort(descending=True)
                    pair_list = []
                    for i in range(num // 2):
                        pair_list.append([ind[i], ind[num - i - 1]])
                    if num % 2 != 0:
                        pair_list.append([ind[num // 2]])
                    client_grads_new = []
                    for pair in pair_list:
                        if len(pair) > 1:
                            grad_0 = client_grads_layer[pair[0]]
                            grad_1 = client_grads_layer[pair[1]]
                            inner_prod = torch.dot(grad_0, grad_1)
                            if inner_prod < 0:
                                grad_pc_0 = grad_0 - inner_prod / ((grad_1**2).sum() + eplison) * grad_1
                                grad_pc_1 = grad_1 - inner_prod / ((grad_0**2).sum() + eplison) * grad_0
                            else:
                                grad_pc_0 = grad_0
                                grad_pc_1 = grad_1
                            client_grads_new.append(grad_pc_0 + grad_pc_1)
                        else:
                            client_grads_new.append(client_grads_layer[pair[0]])
                    client_grads_layer = torch.stack(client_grads_new)
                elif num == 2:
                    grad_pc_0 = client_grads_layer[0]
                    grad_pc_1 = client_grads_layer[1]
                    inner_prod = torch.dot(grad_pc_0, grad_pc_1)
                    if inner_prod < 0:
                        grad_pc_0 = grad_pc_0 - inner_prod / ((grad_pc_1**2).sum() + eplison) * grad_pc_1
                        grad_pc_1 = grad_pc_1 - inner_prod / ((grad_pc_0**2).sum() + eplison) * grad_pc_0
                    grad_new = (grad_pc_0 + grad_pc_1) / client_num
                    break
                else:
                    raise AssertionError
            gamma = 0.99
            grad_history[key] = gamma * grad_history[key] + (1 - gamma) * grad_new
            grads.append(grad_new)
        else:
            grad_new = client_grads_[:, start:end].mean(0)
            grad_history[key] = grad_new
            grads.append(grad_new)
        start = end
    return torch.cat(grads), grad_history


SHAPES = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "bn.running_mean": (4,), "fc.weight": (5, 6),
          "fc.bias": (5,), "bn.num_batches_tracked": ()}  # fmt: skip


def random_deltas(rng, m, shapes=SHAPES, scale=1.0):
    out = []
    for _ in range(m):
        out.append({k: (scale * rng.normal(size=s)).astype(np.float64) for k, s in shapes.items()})
    return out


def flat_torch(delta):
    return torch.cat([torch.as_tensor(np.asarray(v, dtype=np.float64)).reshape(-1) for v in delta.values()])


def unflatten(vec, template):
    out, start = {}, 0
    for k, v in template.items():
        n = int(np.prod(np.shape(v), dtype=int))
        out[k] = vec[start : start + n].reshape(np.shape(v))
        start += n
    return out


def assert_trees_close(a, b, rtol=1e-9, atol=1e-12):
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k], dtype=np.float64), np.asarray(b[k], dtype=np.float64),
                                   rtol=rtol, atol=atol, err_msg=k)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# FedLD: closed form and official procedure


@pytest.mark.parametrize("m", [2, 3, 5, 8, 12])
@pytest.mark.parametrize("d", [2, 3, 7, 60])
@pytest.mark.parametrize("k_proportion", [0.8, 0.5, 1.0])
def test_principal_equals_closed_form(m, d, k_proportion):
    rng = np.random.default_rng(1000 * m + d)
    G = rng.normal(size=(m, d)) * rng.uniform(0.1, 3.0, size=(m, 1))
    deltas = [{"w": G[i]} for i in range(m)]
    out = principal_gradient_aggregate(deltas, k_proportion)["w"]
    k = max(1, int(m * k_proportion))
    ref = closed_form(G, k)
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


@pytest.mark.parametrize("m,k_proportion", [(5, 0.8), (12, 0.8), (4, 0.5), (7, 1.0), (3, 0.7)])
def test_principal_equals_official_transcription(m, k_proportion):
    rng = np.random.default_rng(7 + m)
    deltas = random_deltas(rng, m)
    # the official code: history non-zero from an earlier round (EMA of a previous aggregate)
    history = {k: rng.normal(size=np.shape(v)) for k, v in deltas[0].items()}
    grad_history = {"grad_len": {k: int(np.prod(np.shape(v), dtype=int)) for k, v in deltas[0].items()}}
    grad_history.update({k: torch.as_tensor(v).reshape(-1) for k, v in history.items()})
    official, new_hist = official_pcgrad_svd(m, [flat_torch(d) for d in deltas], grad_history, k_proportion)
    expected = unflatten(official.numpy(), deltas[0])
    ours = principal_gradient_aggregate(deltas, k_proportion, history=history)
    assert_trees_close(ours, expected, rtol=1e-8, atol=1e-12)
    # without gating, the result is the same (history is non-zero for every key)
    assert_trees_close(principal_gradient_aggregate(deltas, k_proportion), expected, rtol=1e-8, atol=1e-12)
    # the EMA of the official code
    ours_hist = update_history(history, ours)
    for k in history:
        np.testing.assert_allclose(ours_hist[k].reshape(-1), new_hist[k].numpy(), rtol=1e-10, atol=1e-14)


def test_official_first_round_and_zero_history_give_plain_mean():
    rng = np.random.default_rng(3)
    m = 5
    deltas = random_deltas(rng, m)
    grad_len = {k: int(np.prod(np.shape(v), dtype=int)) for k, v in deltas[0].items()}
    flats = [flat_torch(d) for d in deltas]
    # round 0: history None everywhere
    gh = {"grad_len": grad_len, **{k: None for k in grad_len}}
    official, gh = official_pcgrad_svd(m, flats, gh, 0.8)
    expected = unflatten(official.numpy(), deltas[0])
    assert_trees_close(principal_gradient_aggregate(deltas, history={}), expected)
    assert_trees_close(mean_delta(deltas), expected)
    # a key whose history is all zero also gets the mean; the others use principal directions
    history = {k: rng.normal(size=np.shape(v)) for k, v in deltas[0].items()}
    history["fc.weight"] = np.zeros((5, 6))
    gh = {"grad_len": grad_len, **{k: torch.as_tensor(v).reshape(-1) for k, v in history.items()}}
    official, _ = official_pcgrad_svd(m, flats, gh, 0.8)
    expected = unflatten(official.numpy(), deltas[0])
    ours = principal_gradient_aggregate(deltas, history=history)
    assert_trees_close(ours, expected, rtol=1e-8)
    np.testing.assert_allclose(ours["fc.weight"], np.mean([d["fc.weight"] for d in deltas], axis=0))
    assert not np.allclose(ours["conv.weight"], np.mean([d["conv.weight"] for d in deltas], axis=0))


def test_principal_update_is_shrunk_by_the_spectrum():
    """‖r_i‖ = ‖Δ_i‖·sqrt(Σ_{j<k} w_j²) (orthonormal v_j), so ‖ḡ‖ <= mean_i ‖Δ_i‖ · sqrt(Σ w_j²)."""
    rng = np.random.default_rng(11)
    G = rng.normal(size=(5, 400))
    out = principal_gradient_aggregate([{"w": g} for g in G])["w"]
    lam = np.linalg.svd(G, compute_uv=False) ** 2
    w = lam / lam.sum()
    bound = np.mean(np.linalg.norm(G, axis=1)) * math.sqrt(np.sum(w[:4] ** 2))
    assert np.linalg.norm(out) <= bound * (1 + 1e-12)
    assert np.linalg.norm(out) < np.mean(np.linalg.norm(G, axis=1))


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(2, 9),
    d=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    k_proportion=st.sampled_from([0.3, 0.5, 0.8, 1.0]),
    data=st.data(),
)
def test_principal_invariant_to_client_order(m, d, seed, k_proportion, data):
    rng = np.random.default_rng(seed)
    deltas = [{"a": rng.normal(size=d), "b": rng.normal(size=(2, 3)) * 1e-3} for _ in range(m)]
    perm = data.draw(st.permutations(range(m)))
    out = principal_gradient_aggregate(deltas, k_proportion)
    out_perm = principal_gradient_aggregate([deltas[i] for i in perm], k_proportion)
    assert_trees_close(out, out_perm, rtol=1e-8, atol=1e-13)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 7), d=st.integers(2, 30), seed=st.integers(0, 2**31 - 1),
       log_scale=st.floats(-250, 250))  # fmt: skip
def test_principal_positively_homogeneous_and_finite(m, d, seed, log_scale):
    """ḡ(cG) = c·ḡ(G) for c > 0, including magnitudes where a naive Gram matrix over/underflows."""
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(m, d))
    base = principal_gradient_aggregate([{"w": g} for g in G])["w"]
    c = 10.0**log_scale
    scaled = principal_gradient_aggregate([{"w": g * c} for g in G])["w"]
    assert np.all(np.isfinite(scaled))
    np.testing.assert_allclose(scaled / c, base, rtol=1e-7, atol=1e-12 * np.abs(base).max())


# ----------------------------------------------------------------------------------------------
# degenerate inputs


def test_all_zero_tensor_gives_zero():
    deltas = [{"w": np.zeros((3, 4)), "b": np.ones(3) * i} for i in range(5)]
    out = principal_gradient_aggregate(deltas)
    assert np.array_equal(out["w"], np.zeros((3, 4)))
    assert np.all(np.isfinite(out["b"]))


def test_one_client_returns_its_delta():
    rng = np.random.default_rng(0)
    deltas = random_deltas(rng, 1)
    out = principal_gradient_aggregate(deltas)
    assert_trees_close(out, deltas[0], rtol=0, atol=0)


def test_scalar_tensors_get_the_plain_mean():
    deltas = [{"s": np.array([float(i)]), "t": np.array(2.0 * i)} for i in range(1, 6)]
    out = principal_gradient_aggregate(deltas)
    assert out["s"].shape == (1,) and out["s"][0] == pytest.approx(3.0)
    assert out["t"].shape == () and float(out["t"]) == pytest.approx(6.0)


def test_parallel_deltas_reduce_to_the_mean():
    """Rank-1 G = c vᵀ (a conv bias in front of BN): one direction with weight 1, so ḡ = mean c_i · v
    exactly; a naive float32 Gram implementation returns NaN here."""
    v = np.random.default_rng(2).normal(size=64)
    coeffs = np.array([2.4e-5, -1.0e-5, 3.3e-5, 0.7e-5, 1.1e-5])
    deltas = [{"bias": (c * v).astype(np.float32)} for c in coeffs]
    out = principal_gradient_aggregate(deltas)["bias"]
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, (coeffs.mean() * v).astype(np.float32), rtol=1e-5, atol=1e-12)
    # and with rounding-level noise on top (real Gram spectra like [2.4e-9, 9e-16, 3e-16, ...])
    noisy = [
        {"bias": (c * v + 1e-12 * np.random.default_rng(i).normal(size=64))} for i, c in enumerate(coeffs)
    ]
    assert np.all(np.isfinite(principal_gradient_aggregate(noisy)["bias"]))


def test_float32_inputs_match_float64_computation():
    rng = np.random.default_rng(5)
    deltas64 = random_deltas(rng, 5, scale=1e-3)
    deltas32 = [{k: v.astype(np.float32) for k, v in d.items()} for d in deltas64]
    out32 = principal_gradient_aggregate(deltas32)
    ref = principal_gradient_aggregate([{k: v.astype(np.float32).astype(np.float64) for k, v in d.items()}
                                        for d in deltas64])  # fmt: skip
    for k in out32:
        assert out32[k].dtype == np.float32
        np.testing.assert_allclose(out32[k], ref[k], rtol=1e-5, atol=1e-9)


def test_integer_buffers_are_cast_back():
    deltas = [{"w": np.arange(6.0) * i, "bn.num_batches_tracked": np.array(n, dtype=np.int64),
               "counts": np.array([n, 2 * n, 3], dtype=np.int32)} for i, n in enumerate([5, 5, 4, 4, 4])]  # fmt: skip
    for agg in (principal_gradient_aggregate(deltas), gradient_harmonize(deltas, history=None),
                mean_delta(deltas, weights=[1, 1, 1, 1, 1])):  # fmt: skip
        assert agg["bn.num_batches_tracked"].dtype == np.int64
        assert agg["bn.num_batches_tracked"].shape == ()
        assert int(agg["bn.num_batches_tracked"]) == 4  # mean 4.4 rounded
        assert agg["counts"].dtype == np.int32
        assert agg["counts"].tolist() == [4, 9, 3]  # means 4.4, 8.8, 3


def test_mixed_degenerate_model_stays_finite():
    rng = np.random.default_rng(9)
    deltas = []
    for i in range(5):
        deltas.append({"zero": np.zeros(10), "huge": rng.normal(size=8) * 1e200, "tiny": rng.normal(size=8) * 1e-300,
                       "d1": rng.normal(size=1), "orth": np.eye(5)[i], "f32": rng.normal(size=7).astype(np.float32)})  # fmt: skip
    out = principal_gradient_aggregate(deltas)
    for k, v in out.items():
        assert np.all(np.isfinite(v)), k
    # mutually orthogonal unit deltas: all λ equal, so the directions are arbitrary within the span, but
    # ‖ḡ‖ <= mean‖Δ_i‖·sqrt(Σ_{j<k} w_j²) = sqrt(4·(1/5)²) = 0.4 whatever they are
    assert np.linalg.norm(out["orth"]) <= 0.4 + 1e-12


def test_k_proportion_too_small_keeps_one_direction():
    assert num_principal_directions(5, 0.1) == 1
    assert num_principal_directions(5, 0.8) == 4
    assert num_principal_directions(12, 0.8) == 9
    rng = np.random.default_rng(4)
    G = rng.normal(size=(5, 20))
    out = principal_gradient_aggregate([{"w": g} for g in G], 0.1)["w"]
    np.testing.assert_allclose(out, closed_form(G, 1), rtol=1e-9)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.0001, 2, float("nan"), float("inf"), "x", None])
def test_bad_k_proportion_is_user_error(bad):
    deltas = [{"w": np.ones(3)}, {"w": np.zeros(3)}]
    with pytest.raises(UserError, match="k_proportion"):
        principal_gradient_aggregate(deltas, bad)


def test_mismatched_inputs_are_user_errors():
    with pytest.raises(UserError, match="non-empty"):
        principal_gradient_aggregate([])
    with pytest.raises(UserError, match="different keys"):
        principal_gradient_aggregate([{"a": np.ones(2)}, {"b": np.ones(2)}])
    with pytest.raises(UserError, match="shape"):
        principal_gradient_aggregate([{"a": np.ones(2)}, {"a": np.ones(3)}])
    with pytest.raises(UserError, match="non-finite"):
        principal_gradient_aggregate([{"a": np.ones(2)}, {"a": np.array([1.0, np.nan])}])
    with pytest.raises(UserError, match="client 1"):
        gradient_harmonize([{"a": np.ones(2)}, {"a": np.array([np.inf, 0])}])
    with pytest.raises(UserError):
        principal_gradient_aggregate({"a": np.ones(2)})  # a dict, not a list of dicts


# ----------------------------------------------------------------------------------------------
# FedGH


@pytest.mark.parametrize("m", [2, 3, 4, 5, 7, 12])
def test_harmonize_equals_official_transcription(m):
    rng = np.random.default_rng(100 + m)
    deltas = random_deltas(rng, m)
    # make conflicts likely: flip some clients
    for i in range(0, m, 2):
        deltas[i] = {k: -v for k, v in deltas[i].items()}
    history = {k: rng.normal(size=np.shape(v)) for k, v in deltas[0].items()}
    gl = {k: int(np.prod(np.shape(v), dtype=int)) for k, v in deltas[0].items()}
    gh = {"grad_len": gl, **{k: torch.as_tensor(v).reshape(-1) for k, v in history.items()}}
    official, new_hist = official_pcgrad_hierarchy(m, [flat_torch(d) for d in deltas], gh)
    ours = gradient_harmonize(deltas, history=history)
    assert_trees_close(ours, unflatten(official.numpy(), deltas[0]), rtol=1e-9, atol=1e-12)
    ours_hist = update_history(history, ours)
    for k in history:
        np.testing.assert_allclose(ours_hist[k].reshape(-1), new_hist[k].numpy(), rtol=1e-10, atol=1e-14)
    # first round: plain mean, history initialised to it (official)
    gh0 = {"grad_len": gl, **{k: None for k in gl}}
    official0, hist0 = official_pcgrad_hierarchy(m, [flat_torch(d) for d in deltas], gh0)
    ours0 = gradient_harmonize(deltas)
    assert_trees_close(ours0, unflatten(official0.numpy(), deltas[0]))
    h0 = update_history(None, ours0)
    for k in h0:
        np.testing.assert_allclose(h0[k].reshape(-1), hist0[k].numpy(), rtol=1e-12)


def test_harmonize_two_clients_by_hand():
    g0, g1 = np.array([1.0, 0.0]), np.array([-1.0, 1.0])
    out = gradient_harmonize([{"w": g0}, {"w": g1}], history={"w": np.array([1.0, 1.0])})["w"]
    # ⟨g0,g1⟩ = -1 < 0: p0 = g0 + g1/(2+ε) ≈ (0.5, 0.5); the official last step then uses the original
    # inner product with the projected p0: p1 = g1 + p0/(‖p0‖²+ε) ≈ (0, 2); result (p0 + p1)/2
    eps = 1e-7
    p0 = g0 + 1.0 / (2 + eps) * g1
    p1 = g1 + 1.0 / (p0 @ p0 + eps) * p0
    np.testing.assert_allclose(out, (p0 + p1) / 2, rtol=1e-12)
    np.testing.assert_allclose(out, [0.25, 1.25], atol=1e-6)
    # no conflict: plain mean
    out = gradient_harmonize([{"w": g0}, {"w": np.array([1.0, 2.0])}], history={"w": np.ones(2)})["w"]
    np.testing.assert_allclose(out, [1.0, 1.0])


def test_harmonize_one_client_and_zero_history():
    d = {"w": np.array([1.0, -2.0])}
    np.testing.assert_allclose(gradient_harmonize([d], history={"w": np.ones(2)})["w"], d["w"])
    rng = np.random.default_rng(1)
    deltas = [{"w": rng.normal(size=6)} for _ in range(5)]
    out = gradient_harmonize(deltas, history={"w": np.zeros(6)})["w"]
    assert np.all(np.isfinite(out))


# ----------------------------------------------------------------------------------------------
# means, diagnostics, SCAFFOLD


def test_mean_delta_weighted_by_hand():
    deltas = [{"w": np.array([1.0, 0.0], dtype=np.float32)}, {"w": np.array([0.0, 4.0], dtype=np.float32)}]
    out = mean_delta(deltas, weights=[30, 10])["w"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.75, 1.0])
    np.testing.assert_allclose(mean_delta(deltas)["w"], [0.5, 2.0])
    with pytest.raises(UserError, match="weights"):
        mean_delta(deltas, weights=[1, -1])
    with pytest.raises(UserError, match="weights"):
        mean_delta(deltas, weights=[1])


def test_update_size_ratio_by_hand():
    deltas = [{"w": np.array([2.0, 0.0]), "n": np.array(3)}, {"w": np.array([0.0, 2.0]), "n": np.array(3)}]
    agg = {"w": np.array([0.5, 0.0]), "n": np.array(3)}
    r = update_size_ratio(deltas, agg, weights=[3, 1])
    # unweighted mean (1, 1): ratio 0.5/sqrt(2), cosine 1/sqrt(2); weighted (1.5, 0.5)
    assert r["ratio_unweighted"] == pytest.approx(0.5 / math.sqrt(2))
    assert r["cosine_unweighted"] == pytest.approx(1 / math.sqrt(2))
    assert r["ratio_weighted"] == pytest.approx(0.5 / math.sqrt(2.5))
    assert r["cosine_weighted"] == pytest.approx(1.5 / math.sqrt(2.5))
    assert r["tensor_ratio_min"] == r["tensor_ratio_max"] == pytest.approx(0.5 / math.sqrt(2))
    assert "ratio_weighted" not in update_size_ratio(deltas, agg)
    # FedLD on real-ish data: ratio <= 1 and equals the norm quotient
    rng = np.random.default_rng(0)
    ds = [{"a": rng.normal(size=50)} for _ in range(5)]
    ld = principal_gradient_aggregate(ds)
    rr = update_size_ratio(ds, ld)
    mean = np.mean([d["a"] for d in ds], axis=0)
    assert rr["ratio_unweighted"] == pytest.approx(np.linalg.norm(ld["a"]) / np.linalg.norm(mean))
    assert rr["cosine_unweighted"] == pytest.approx(
        ld["a"] @ mean / np.linalg.norm(ld["a"]) / np.linalg.norm(mean)
    )
    zero = update_size_ratio([{"a": np.zeros(2)}], {"a": np.zeros(2)})
    assert math.isnan(zero["ratio_unweighted"]) and math.isnan(zero["cosine_unweighted"])


def test_scaffold_control_updates_by_hand():
    c_i = {"w": np.array([1.0, 2.0])}
    c = {"w": np.array([0.5, 0.5])}
    delta = {"w": np.array([-0.1, 0.2])}  # θ - w
    new = scaffold_control_update(c_i, c, delta, num_steps=10, lr=0.01)["w"]
    np.testing.assert_allclose(new, [1.0 - 0.5 + 0.1 / 0.1, 2.0 - 0.5 - 0.2 / 0.1])
    server = scaffold_server_control(c, [{"w": np.array([1.0, 0.0])}, {"w": np.array([0.0, 1.0])}], 4)["w"]
    np.testing.assert_allclose(server, [0.5 + 0.5 * 0.5, 0.5 + 0.5 * 0.5])
    with pytest.raises(UserError):
        scaffold_control_update(c_i, c, delta, num_steps=0, lr=0.01)


# ----------------------------------------------------------------------------------------------
# FedPAC


def simplex_qp_by_enumeration(p):
    """Exact argmin αᵀPα on the simplex: the best feasible stationary point over every support set."""
    import itertools

    m = p.shape[0]
    best, best_val = None, np.inf
    for r in range(1, m + 1):
        for support in itertools.combinations(range(m), r):
            s = list(support)
            try:
                x = np.linalg.solve(p[np.ix_(s, s)], np.ones(r))
            except np.linalg.LinAlgError:
                continue
            if x.sum() == 0:
                continue
            a_s = x / x.sum()
            if np.any(a_s < -1e-12):
                continue
            a = np.zeros(m)
            a[s] = a_s
            val = a @ p @ a
            if val < best_val:
                best, best_val = a, val
    return best


def official_p_matrix(vars_, hs, i):
    """The official get_head_agg_weight's P for client i, with its explicit loops (trace of outer products)."""
    m = len(vars_)
    num_cls, d = hs[0].shape
    dist = np.zeros((m, m))
    for j1 in range(m):
        for j2 in range(j1, m):
            h = np.zeros((d, d))
            for k in range(num_cls):
                h += np.outer(hs[i][k] - hs[j1][k], hs[i][k] - hs[j2][k])
            dist[j1, j2] = dist[j2, j1] = np.trace(h)
    return np.diag(vars_) + dist


@pytest.mark.parametrize("m", [2, 3, 5, 6])
def test_fedpac_head_weights_are_the_exact_qp_solution(m):
    rng = np.random.default_rng(50 + m)
    vars_ = rng.uniform(0.05, 1.0, size=m)
    hs = [rng.normal(size=(4, 6)) * rng.uniform(0.2, 1.5) for _ in range(m)]
    weights = fedpac_head_weights(vars_, hs)
    for i in range(m):
        p = official_p_matrix(vars_, hs, i)
        ref = simplex_qp_by_enumeration(p)
        ref = np.where(ref > 1e-3, ref, 0.0)
        np.testing.assert_allclose(weights[i], ref, atol=2e-5)
        assert weights[i][i] > 0  # a client always gives its own head weight (D[i, i] = 0)


def test_fedpac_statistics_and_prototypes_by_hand():
    feats = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    labels = np.array([0, 0, 1, 1])
    v, h = fedpac_statistics(feats, labels, num_classes=3)
    # p = (1/2, 1/2, 0); μ0 = (2, 0), μ1 = (2.5, 3.5); E‖f‖² per class: (1 + 9)/2 = 5, (4 + 50)/2 = 27
    np.testing.assert_allclose(h, [[1.0, 0.0], [1.25, 1.75], [0.0, 0.0]])
    expected = (0.5 * 5 - 0.25 * 4) + (0.5 * 27 - 0.25 * (2.5**2 + 3.5**2))
    assert v == pytest.approx(expected / 4)
    protos, sizes = class_prototypes(feats, labels)
    np.testing.assert_allclose(protos[1], [2.5, 3.5])
    assert sizes == {0: 2, 1: 2}
    other = ({0: np.array([0.0, 4.0])}, {0: 6})
    agg = aggregate_prototypes([protos, other[0]], [sizes, other[1]])
    np.testing.assert_allclose(agg[0], (2 * np.array([2.0, 0.0]) + 6 * np.array([0.0, 4.0])) / 8)
    np.testing.assert_allclose(agg[1], [2.5, 3.5])
    heads = [{"w": np.array([1.0, 1.0], np.float32)}, {"w": np.array([3.0, -1.0], np.float32)}]
    np.testing.assert_allclose(combine_heads(heads, np.array([0.3, 0.1]))["w"], [1.5, 0.5])
