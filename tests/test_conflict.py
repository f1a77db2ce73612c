"""FOUL (CAGrad-style server step, sub-network choice) and FedOSD geometry.

Expected values come from independent formulas: a closed-form solution of a 2-D
dual, a brute-force grid over the simplex, random sampling of the primal ball and
numpy least squares for the FedOSD projection.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fed_unlearn.methods.fedosd import orthogonal_direction, post_project
from fed_unlearn.methods.foul.geometry import (
    cagrad_direction,
    conflict_scores,
    norm_ratios,
    select_subnetwork,
    select_subnetwork_detailed,
)


def _dual_objective(gamma: np.ndarray, sg: np.ndarray, g0: np.ndarray, kappa: float):
    """F(Γ) = ⟨g_Γ, g0⟩ + κ‖g0‖‖g_Γ‖ for rows of ``gamma`` (float64, no Gram)."""
    g_gamma = gamma @ sg
    return g_gamma @ g0 + kappa * np.linalg.norm(g0) * np.linalg.norm(g_gamma, axis=-1)


def _toy(seed: int, n_retain: int, n_forget: int, dim: int):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(n_retain + n_forget, dim, generator=gen)
    signs = [1] * n_retain + [-1] * n_forget
    weights = [float(i + 1) for i in range(n_retain)] + [0.0] * n_forget
    return grads, signs, weights


# ------------------------------------------------------------------- FOUL: values
def test_kappa_zero_returns_g0():
    grads, signs, weights = _toy(0, 3, 2, 50)
    step = cagrad_direction(grads, signs, weights, kappa=0.0)
    g0 = (1 * grads[0] + 2 * grads[1] + 3 * grads[2]) / 6
    torch.testing.assert_close(step.direction, g0, rtol=0, atol=1e-6)
    assert step.g0_norm == pytest.approx(float(g0.norm()), rel=1e-6)
    assert step.gamma.shape == (5,)
    assert step.gamma.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("kappa", [0.5, 1.0, 2.0, 5.0])
def test_hand_computed_2d(kappa):
    # g_r = (1, 0) (retain), g_f = (0, 1) (forget): s·g = (1, 0), (0, -1); g0 = (1, 0).
    # With γ = weight of the retain client: g_Γ = (γ, -(1 - γ)),
    # F(γ) = γ + κ·sqrt(γ² + (1-γ)²).  F'(γ) = 0 with t = 2γ - 1 gives
    # t = -1/sqrt(2κ² - 1) for κ > 1; for κ <= 1, F' >= 0 on [0, 1] so γ = 0.
    gamma_r = (1 - 1 / math.sqrt(2 * kappa**2 - 1)) / 2 if kappa > 1 else 0.0
    g_gamma = np.array([gamma_r, -(1 - gamma_r)])
    expected_d = np.array([1.0, 0.0]) + kappa * g_gamma / np.linalg.norm(g_gamma)
    expected_f = gamma_r + kappa * np.linalg.norm(g_gamma)

    grads = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    step = cagrad_direction(grads, [1, -1], [1.0, 0.0], kappa)
    assert step.gamma[0] == pytest.approx(gamma_r, abs=1e-4)
    np.testing.assert_allclose(step.direction.numpy(), expected_d, atol=1e-4)
    assert step.objective == pytest.approx(expected_f, abs=1e-6)
    assert step.g0_norm == pytest.approx(1.0)
    # inner products reported = inner products recomputed from d
    assert step.min_retain_inner == pytest.approx(expected_d[0], abs=1e-4)
    assert step.max_forget_inner == pytest.approx(expected_d[1], abs=1e-4)
    assert not step.degenerate


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slsqp_matches_grid_search_u3(seed):
    grads, signs, weights = _toy(seed, 2, 1, 6)
    kappa = 0.7
    step = cagrad_direction(grads, signs, weights, kappa)
    g = grads.double().numpy()
    sg = np.asarray(signs, dtype=float)[:, None] * g
    w = np.asarray(weights) / sum(weights)
    g0 = w @ g
    # brute force over the simplex, step 1/600
    n = 600
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    mask = i + j <= n
    grid = np.stack([i[mask], j[mask], n - i[mask] - j[mask]], axis=1) / n
    values = _dual_objective(grid, sg, g0, kappa)
    best = grid[np.argmin(values)]
    f_star = float(_dual_objective(step.gamma[None], sg, g0, kappa)[0])
    assert f_star <= values.min() + 1e-9  # never worse than the grid
    assert f_star == pytest.approx(values.min(), abs=1e-3 * np.abs(sg).max() ** 2)
    assert step.objective == pytest.approx(f_star, rel=1e-5, abs=1e-6)
    # d from the grid's Γ is close to d from SLSQP's Γ
    gb = best @ sg
    d_grid = g0 + kappa * np.linalg.norm(g0) * gb / np.linalg.norm(gb)
    np.testing.assert_allclose(step.direction.numpy(), d_grid, atol=2e-2)


@pytest.mark.parametrize("seed", [3, 4])
def test_direction_maximises_the_primal(seed):
    grads, signs, weights = _toy(seed, 4, 2, 8)
    kappa = 0.5
    step = cagrad_direction(grads, signs, weights, kappa)
    g = grads.double().numpy()
    sg = np.asarray(signs, dtype=float)[:, None] * g
    w = np.asarray(weights) / sum(weights)
    g0 = w @ g
    radius = kappa * np.linalg.norm(g0)
    d = step.direction.double().numpy()
    v_star = (sg @ d).min()
    # d lies on the ball's boundary and strong duality holds
    assert np.linalg.norm(d - g0) == pytest.approx(radius, rel=1e-4)
    assert v_star == pytest.approx(step.objective, rel=1e-4, abs=1e-5)
    rng = np.random.default_rng(seed)
    tol = 1e-4 * np.linalg.norm(sg, axis=1).max() * np.linalg.norm(g0)
    # 1) uniform samples over the whole ball (boundary and interior)
    u = rng.standard_normal((200_000, 8))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    r = radius * rng.random(200_000) ** (1 / 8)
    r[:100_000] = radius
    pts = g0 + u * r[:, None]
    assert (pts @ sg.T).min(axis=1).max() <= v_star + tol
    # 2) small perturbations of d, pulled back into the ball
    p = d + 1e-2 * radius * rng.standard_normal((50_000, 8))
    off = p - g0
    norms = np.linalg.norm(off, axis=1, keepdims=True)
    p = g0 + off * np.minimum(1.0, radius / norms)
    assert (p @ sg.T).min(axis=1).max() <= v_star + tol


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_conflict_geometry_when_feasible(seed):
    # 3 retain vectors in a cone around e1 (no e2 component), one forget vector
    # 0.5·e1 + e2 that agrees with g0; d = e1 - e2 satisfies every constraint.
    dim = 30
    gen = torch.Generator().manual_seed(seed)
    noise = 0.2 * torch.randn(3, dim, generator=gen)
    noise[:, 1] = 0.0
    e1, e2 = torch.eye(dim)[0], torch.eye(dim)[1]
    retain = e1 + noise
    forget = 0.5 * e1 + e2
    grads = torch.cat([retain, forget[None]])
    signs, weights = [1, 1, 1, -1], [1.0, 1.0, 1.0, 0.0]

    plain = cagrad_direction(grads, signs, weights, kappa=0.0)
    assert plain.max_forget_inner > 0.1  # FedAvg without F still helps F

    step = cagrad_direction(grads, signs, weights, kappa=3.0)
    inner = (grads @ step.direction).numpy()
    assert (inner[:3] >= 0).all()
    assert inner[3] <= 0
    assert step.min_retain_inner == pytest.approx(inner[:3].min(), abs=1e-5)
    assert step.max_forget_inner == pytest.approx(inner[3], abs=1e-5)


@pytest.mark.parametrize("c", [1e-3, 7.0, 1e3])
def test_scale_invariance(c):
    grads, signs, weights = _toy(5, 4, 2, 40)
    base = cagrad_direction(grads, signs, weights, kappa=0.6)
    scaled = cagrad_direction(grads * c, signs, weights, kappa=0.6)
    np.testing.assert_allclose(scaled.gamma, base.gamma, atol=1e-5)
    torch.testing.assert_close(
        scaled.direction, base.direction * c, rtol=1e-4, atol=1e-6 * c
    )
    assert scaled.g0_norm == pytest.approx(base.g0_norm * c, rel=1e-5)


def test_degenerate_hull_returns_g0():
    # retain g = v and forget g = v: s·g = v, -v.  F(γ) = (2γ-1)‖v‖² + κ|2γ-1|‖v‖².
    v = torch.tensor([3.0, -1.0, 2.0])
    grads = torch.stack([v, v])
    # κ = 2: minimum at γ = 1/2 where g_Γ = 0 -> flagged, d = g0 = v
    step = cagrad_direction(grads, [1, -1], [1.0, 0.0], kappa=2.0)
    assert step.degenerate
    torch.testing.assert_close(step.direction, v)
    np.testing.assert_allclose(step.gamma, [0.5, 0.5], atol=1e-4)
    # κ = 0.5: minimum at γ = 0 (all weight on the forget client), d = (1-κ)·v
    step = cagrad_direction(grads, [1, -1], [1.0, 0.0], kappa=0.5)
    assert not step.degenerate
    torch.testing.assert_close(step.direction, 0.5 * v, rtol=1e-4, atol=1e-5)


def test_float64_is_kept_and_other_dtypes_cast():
    grads, signs, weights = _toy(6, 2, 1, 10)
    assert cagrad_direction(grads.double(), signs, weights, 0.5).direction.dtype == (
        torch.float64
    )
    half = cagrad_direction(grads.half(), signs, weights, 0.5)
    assert half.direction.dtype == torch.float32
    # cast, not recomputed in half precision: the same step as the fp32 solve of
    # the fp16-rounded gradients
    as_fp32 = cagrad_direction(grads.half().float(), signs, weights, 0.5)
    torch.testing.assert_close(half.direction, as_fp32.direction, rtol=0, atol=0)
    np.testing.assert_array_equal(half.gamma, as_fp32.gamma)


def test_solve_seconds_is_the_dual_solve_wall_time(monkeypatch):
    import types

    import fed_unlearn.methods.foul.geometry as C

    ticks = iter([100.0, 102.5])  # the clock read before and after SLSQP
    fake = types.SimpleNamespace(perf_counter=lambda: next(ticks))
    monkeypatch.setattr(C, "time", fake)
    grads, signs, weights = _toy(6, 2, 1, 10)
    assert cagrad_direction(grads, signs, weights, 0.5).solve_seconds == 2.5
    # all-zero gradients: nothing is solved (the clock is not read again)
    zero = cagrad_direction(torch.zeros(3, 4), signs, weights, 0.5)
    assert zero.solve_seconds == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kappa": -0.1}, "kappa"),
        ({"kappa": float("nan")}, "kappa"),
        ({"signs": [1, 1, 1]}, "signs"),
        ({"weights": [1.0, 1.0]}, "weights"),
        ({"signs": [1, 1, 1, 1]}, "forget client"),
        ({"signs": [-1, -1, -1, -1]}, "retain client"),
        ({"signs": [1, 1, 0, -1]}, r"\+1"),
        ({"weights": [0.0, 0.0, 0.0, 1.0]}, "retain-client weights are zero"),
        ({"weights": [1.0, -1.0, 1.0, 0.0]}, ">= 0"),
        ({"grads": torch.randn(1, 5)}, "at least 2"),
        ({"grads": torch.randn(20)}, "2-D"),
        ({"grads": torch.ones(4, 5, dtype=torch.int64)}, "floating"),
    ],
)
def test_cagrad_errors(kwargs, match):
    args = {
        "grads": torch.randn(4, 5),
        "signs": [1, 1, 1, -1],
        "weights": [1.0, 1.0, 1.0, 0.0],
        "kappa": 0.5,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cagrad_direction(**args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_cagrad_rejects_non_finite(bad):
    grads = torch.randn(4, 5)
    grads[2, 3] = bad
    with pytest.raises(ValueError, match=r"NaN/Inf \(client rows \[2\]\)"):
        cagrad_direction(grads, [1, 1, 1, -1], [1.0, 1.0, 1.0, 0.0], 0.5)


# --------------------------------------------------------- FOUL: sub-network
F = {
    "a": torch.tensor([1.0, 0.0]),
    "b": torch.tensor([1.0, 0.0]),
    "c": torch.tensor([1.0, 1.0]),
    "z": torch.tensor([0.0, 0.0]),
}
R = {
    "a": torch.tensor([2.0, 0.0]),  # cos 1, ratio 0.5
    "b": torch.tensor([-1.0, 0.0]),  # cos -1, ratio 1
    "c": torch.tensor([1.0, 0.0]),  # cos 1/sqrt2, ratio sqrt2
    "z": torch.tensor([0.0, 3.0]),  # forget norm 0: cos 0, ratio 0
}


def test_conflict_scores_and_ratios_golden():
    scores = conflict_scores(F, R)
    assert list(scores) == ["a", "b", "c", "z"]
    assert scores == pytest.approx({"a": 1.0, "b": -1.0, "c": 2**-0.5, "z": 0.0})
    ratios = norm_ratios(F, R)
    assert ratios == pytest.approx({"a": 0.5, "b": 1.0, "c": 2**0.5, "z": 0.0})


def test_norm_ratio_of_zero_retain_is_finite():
    ratios = norm_ratios({"x": torch.ones(3)}, {"x": torch.zeros(3)})
    assert ratios["x"] == pytest.approx(math.sqrt(3) / 1e-12)
    assert conflict_scores({"x": torch.ones(3)}, {"x": torch.zeros(3)}) == {"x": 0.0}


def test_select_conflict_rule():
    assert select_subnetwork(F, R) == ["b"]
    assert select_subnetwork(F, R, tau=0.8) == ["b", "c", "z"]
    sel = select_subnetwork_detailed(F, R, tau=0.8)
    assert sel.rule == "conflict" and not sel.fell_back


def test_select_conflict_falls_back_to_ratio():
    f = {k: v for k, v in F.items() if k != "b"}
    r = {k: v for k, v in R.items() if k != "b"}
    sel = select_subnetwork_detailed(f, r, tau=-0.5, top_p=0.25)
    assert sel.fell_back and sel.rule == "ratio"
    assert sel.keys == ["c"]  # largest ratio; ceil(0.25 * 3) = 1 tensor
    assert select_subnetwork(f, r, tau=-0.5, top_p=0.25) == ["c"]


def test_select_ratio_rule_top_p():
    assert select_subnetwork(F, R, rule="ratio", top_p=0.25) == ["c"]
    # ratio ranking c (1.41) > b (1.0) > a (0.5) > z (0)
    assert select_subnetwork(F, R, rule="ratio", top_p=0.5) == ["b", "c"]
    assert select_subnetwork(F, R, rule="ratio", top_p=0.6) == ["a", "b", "c"]
    assert select_subnetwork(F, R, rule="ratio", top_p=0.01) == ["c"]  # >= 1
    assert select_subnetwork(F, R, rule="ratio", top_p=1.0) == ["a", "b", "c", "z"]


@pytest.mark.parametrize(
    ("forget", "retain", "kwargs", "match"),
    [
        ({}, {}, {}, "empty"),
        ({"a": torch.ones(2)}, {"b": torch.ones(2)}, {}, "keys differ"),
        ({"a": torch.ones(2)}, {"a": torch.ones(3)}, {}, "shape mismatch"),
        ({"a": torch.tensor([1.0, float("nan")])}, {"a": torch.ones(2)}, {}, "NaN"),
        (F, R, {"rule": "magic"}, "unknown sub-network rule"),
        (F, R, {"top_p": 0.0}, "top_p"),
        (F, R, {"top_p": 1.5}, "top_p"),
    ],
)
def test_select_errors(forget, retain, kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_subnetwork(forget, retain, **kwargs)


# ------------------------------------------------------------------------ FedOSD
def _reference_projection(g: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """g minus its least-squares projection on the row space (float64 lstsq)."""
    coef, *_ = np.linalg.lstsq(rows.T, g, rcond=None)
    return g - rows.T @ coef


def _assert_orthogonal(d: torch.Tensor, rows: torch.Tensor, rtol: float = 1e-5):
    for row in rows:
        assert abs(float(d @ row)) < rtol * float(d.norm()) * float(row.norm()) + 1e-30


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e3])
def test_orthogonal_direction(scale):
    gen = torch.Generator().manual_seed(0)
    rows = scale * torch.randn(4, 100, generator=gen)
    g = scale * torch.randn(100, generator=gen)
    d = orthogonal_direction(g, rows)
    _assert_orthogonal(d, rows)
    assert float(d.norm()) == pytest.approx(float(g.norm()), rel=1e-5)
    ref = _reference_projection(g.double().numpy(), rows.double().numpy())
    ref *= np.linalg.norm(g.double().numpy()) / np.linalg.norm(ref)
    np.testing.assert_allclose(d.double().numpy(), ref, rtol=1e-4, atol=1e-5 * scale)


def test_orthogonal_direction_rank_deficient():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 60, generator=gen)
    rows = torch.stack([a, a, b, a + b, 2 * b])  # rank 2
    g = torch.randn(60, generator=gen)
    d = orthogonal_direction(g, rows)
    _assert_orthogonal(d, rows)
    assert float(d.norm()) == pytest.approx(float(g.norm()), rel=1e-5)
    ref = _reference_projection(
        g.double().numpy(), torch.stack([a, b]).double().numpy()
    )
    ref *= np.linalg.norm(g.double().numpy()) / np.linalg.norm(ref)
    np.testing.assert_allclose(d.double().numpy(), ref, rtol=1e-4, atol=1e-5)


def test_orthogonal_direction_edge_cases():
    rows = torch.randn(3, 10)
    assert torch.equal(orthogonal_direction(torch.zeros(10), rows), torch.zeros(10))
    g = torch.randn(10)
    torch.testing.assert_close(orthogonal_direction(g, torch.empty(0, 10)), g)
    torch.testing.assert_close(orthogonal_direction(g, torch.zeros(2, 10)), g)
    in_span = 2.0 * rows[0] - rows[2]
    assert torch.equal(orthogonal_direction(in_span, rows), torch.zeros(10))
    assert orthogonal_direction(g.double(), rows).dtype == torch.float64
    with pytest.raises(ValueError, match="columns"):
        orthogonal_direction(g, torch.randn(3, 11))
    with pytest.raises(ValueError, match="NaN"):
        orthogonal_direction(torch.full((10,), float("nan")), rows)
    with pytest.raises(ValueError, match="1-D"):
        orthogonal_direction(rows, rows)


def test_post_project():
    out = post_project(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(out, torch.tensor([0.0, math.sqrt(2.0)]))
    gen = torch.Generator().manual_seed(2)
    g, ga = torch.randn(2, 500, generator=gen)
    p = post_project(g, ga)
    assert abs(float(p @ ga)) < 1e-5 * float(p.norm()) * float(ga.norm())
    assert float(p.norm()) == pytest.approx(float(g.norm()), rel=1e-5)
    torch.testing.assert_close(post_project(g, torch.zeros(500)), g)
    assert torch.equal(post_project(2 * ga, ga), torch.zeros(500))
    with pytest.raises(ValueError, match="shape"):
        post_project(g, torch.ones(3))
    with pytest.raises(ValueError, match="ga contains NaN"):
        post_project(g, torch.full((500,), float("inf")))


def test_orthogonal_direction_rejects_non_finite_rows():
    rows = torch.randn(3, 10)
    rows[1, 4] = float("nan")
    with pytest.raises(ValueError, match="G_r contains NaN"):
        orthogonal_direction(torch.randn(10), rows)


def test_orthogonal_direction_ill_conditioned_rows():
    # nearly collinear rows (singular values 1 : 3e-3); the second projection
    # pass keeps the fp32 result orthogonal well below the 1e-5 of a single pass
    gen = torch.Generator().manual_seed(0)
    a, b, c, g = torch.randn(4, 100_000, generator=gen)
    rows = torch.stack([a, a + 3e-3 * b, c, c + 3e-3 * a])
    d = orthogonal_direction(g, rows)
    _assert_orthogonal(d, rows, rtol=1e-6)


def test_blas_runs_on_one_thread_during_the_solve_and_is_restored_after(monkeypatch):
    """The dual solve sees one BLAS thread (threadpoolctl's own report, read from
    inside SLSQP's objective), and the counts before are back after it."""
    from threadpoolctl import threadpool_info

    import fed_unlearn.methods.foul.geometry as C

    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    if not blas:
        pytest.skip("no BLAS loaded that threadpoolctl can control")
    before = [i["num_threads"] for i in blas]
    seen = []
    real = C.minimize

    def spy(fun, *args, **kwargs):
        def wrapped(x):
            seen.append(
                {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
            )
            return fun(x)

        return real(wrapped, *args, **kwargs)

    monkeypatch.setattr(C, "minimize", spy)
    grads, signs, weights = _toy(7, 3, 1, 20)
    C.cagrad_direction(grads, signs, weights, 0.5)
    assert seen and all(s == {1} for s in seen)
    assert [
        i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"
    ] == before
