"""MPU server pre/post-processing for LoRA adapters (spec B.2, B.8, C)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fed_unlearn.adapters import InvalidUpdateError, lora_pairs, sub
from fed_unlearn.mpu_ops import (
    MPUSecrets,
    apply_gauge,
    draw_gauge,
    draw_secrets,
    harmonic_merge,
    invert_gauge,
    merge_returned,
    prepare_copies,
    zero_sum_noise,
)
from fed_unlearn.protocol import pack_copies, unpack_copies

P0 = "base_model.model.model.layers.0.self_attn.q_proj"
P1 = "base_model.model.model.layers.1.mlp.down_proj"
NORM = "base_model.model.model.norm.weight"  # a non-LoRA tensor outside any layer


def _adapter(seed: int = 0, r: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"{P0}.lora_A.weight": torch.randn(r, 16, generator=gen),
        f"{P0}.lora_B.weight": 0.01 * torch.randn(24, r, generator=gen),
        f"{P1}.lora_A.weight": 3.0 * torch.randn(r, 20, generator=gen),
        f"{P1}.lora_B.weight": 0.1 * torch.randn(12, r, generator=gen),
        NORM: torch.randn(8, generator=gen),
    }


# ------------------------------------------------------------------------- secrets
def test_draw_secrets_schedules_and_determinism():
    lin = draw_secrets(3, "linear", seed=1)
    assert lin.alphas == (1.0, 1.5, 2.0)
    assert draw_secrets(2, "linear", seed=1).alphas == (1.0, 2.0)
    a = draw_secrets(4, "random", seed=7)
    assert a == draw_secrets(4, "random", seed=7)
    assert a != draw_secrets(4, "random", seed=8)
    assert list(a.alphas) == sorted(a.alphas)
    assert all(1.0 <= x <= 3.0 for x in a.alphas)
    assert a.m == 4


def test_draw_secrets_fresh_without_seed():
    draws = [draw_secrets(3) for _ in range(3)]
    assert len({d.noise_seed for d in draws}) == 3
    assert len({d.gauge_seed for d in draws}) == 3
    assert len({d.alphas for d in draws}) == 3
    assert all(0 <= d.noise_seed < 2**64 for d in draws)
    text = repr(draws[0])  # secrets hidden from logs
    assert str(draws[0].noise_seed) not in text and str(draws[0].alphas[0]) not in text


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: draw_secrets(1), "m >= 2"),
        (lambda: draw_secrets(3, "geometric"), "unknown alpha schedule"),
        (lambda: MPUSecrets((1.0,), 1, 2), "m >= 2"),
        (lambda: MPUSecrets((1.0, 0.0), 1, 2), "> 0"),
    ],
)
def test_secrets_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- noise
def test_noise_is_zero_sum_after_alpha_weighting():
    adapter = _adapter()
    alphas = (1.0, 1.7, 2.5)
    eps = zero_sum_noise(adapter, 3, 0.1, alphas, seed=11)
    for key, ref in adapter.items():
        total = sum(e[key] / a for e, a in zip(eps, alphas, strict=True))
        sigma = 0.1 * float(ref.double().pow(2).mean().sqrt())
        assert float(total.abs().max()) <= 1e-6 * sigma
        assert eps[0][key].dtype == torch.float32
        assert not torch.equal(eps[0][key], eps[1][key])


def test_noise_std_matches_sigma_per_tensor():
    big = {"w": 2.0 * torch.randn(512, 512, generator=torch.Generator().manual_seed(0))}
    kappa, alphas = 0.05, (1.0, 2.0, 3.0)
    sigma = kappa * math.sqrt(float((big["w"].double() ** 2).mean()))
    eps = zero_sum_noise(big, 3, kappa, alphas, seed=3)
    for e, a in zip(eps, alphas, strict=True):
        eps0 = (e["w"] / a).double()
        assert float(eps0.std()) == pytest.approx(sigma, rel=0.05)
        assert abs(float(eps0.mean())) < 0.02 * sigma


def test_noise_layer_granularity_pools_a_layer():
    gen = torch.Generator().manual_seed(5)
    adapter = {
        "x.layers.0.q.lora_A.weight": torch.randn(64, 256, generator=gen),  # RMS 1
        "x.layers.0.q.lora_B.weight": 0.01 * torch.randn(256, 64, generator=gen),
        "x.layers.1.q.lora_A.weight": 5.0 * torch.randn(64, 256, generator=gen),
        "x.norm.weight": 7.0 * torch.randn(128, 128, generator=gen),
    }
    kappa = 0.1
    eps = zero_sum_noise(adapter, 2, kappa, (1.0, 1.0), seed=0, granularity="layer")

    def rms(*ts):
        return math.sqrt(
            sum(float((t.double() ** 2).sum()) for t in ts) / sum(t.numel() for t in ts)
        )

    layer0 = kappa * rms(
        adapter["x.layers.0.q.lora_A.weight"], adapter["x.layers.0.q.lora_B.weight"]
    )
    expected = {
        "x.layers.0.q.lora_A.weight": layer0,
        "x.layers.0.q.lora_B.weight": layer0,  # pooled, not its own (100x smaller) RMS
        "x.layers.1.q.lora_A.weight": kappa
        * rms(adapter["x.layers.1.q.lora_A.weight"]),
        "x.norm.weight": kappa * rms(adapter["x.norm.weight"]),
    }
    for key, sigma in expected.items():
        assert float(eps[0][key].double().std()) == pytest.approx(sigma, rel=0.05), key
    per_tensor = zero_sum_noise(adapter, 2, kappa, (1.0, 1.0), seed=0)
    b = "x.layers.0.q.lora_B.weight"
    assert float(per_tensor[0][b].std()) < 0.05 * float(eps[0][b].std())


def test_noise_determinism_and_edge_cases():
    adapter = _adapter()
    a = zero_sum_noise(adapter, 2, 0.1, (1.0, 2.0), seed=42)
    b = zero_sum_noise(adapter, 2, 0.1, (1.0, 2.0), seed=42)
    c = zero_sum_noise(adapter, 2, 0.1, (1.0, 2.0), seed=43)
    for key in adapter:
        assert torch.equal(a[0][key], b[0][key])
        assert not torch.equal(a[0][key], c[0][key])
    twins = {"u": torch.ones(3, 4), "v": torch.ones(3, 4)}  # same shape and RMS
    tw = zero_sum_noise(twins, 2, 0.1, (1.0, 2.0), seed=1)
    assert not torch.equal(tw[0]["u"], tw[0]["v"])  # the seed depends on the name
    zero = zero_sum_noise({"b": torch.zeros(3, 4)}, 2, 0.1, (1.0, 2.0), seed=1)
    assert torch.equal(zero[0]["b"], torch.zeros(3, 4))
    none = zero_sum_noise(adapter, 2, 0.0, (1.0, 2.0), seed=1)
    assert all(float(t.abs().max()) == 0.0 for t in none[1].values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"m": 1, "alphas": (1.0,)}, "m >= 2"),
        ({"kappa": -0.01}, "kappa"),
        ({"alphas": (1.0, 2.0, 3.0)}, "3 alphas for m=2"),
        ({"alphas": (1.0, -2.0)}, "> 0"),
        ({"granularity": "block"}, "granularity"),
        ({"adapter": {}}, "non-empty"),
        ({"adapter": {"w": torch.tensor([1.0, float("nan")])}}, "'w' contains NaN"),
    ],
)
def test_noise_errors(kwargs, match):
    args = {
        "adapter": _adapter(),
        "m": 2,
        "kappa": 0.1,
        "alphas": (1.0, 2.0),
        "seed": 0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        zero_sum_noise(**args)


# --------------------------------------------------------------------------- gauge
def test_gauge_matrices():
    adapter = _adapter()
    orth = draw_gauge(adapter, 3, seed=9)
    assert len(orth) == 3 and set(orth[0]) == set(lora_pairs(adapter))
    for q in orth[1].values():
        torch.testing.assert_close(q.T @ q, torch.eye(4, dtype=q.dtype))
    assert not torch.allclose(orth[0][P0], orth[1][P0])
    perm = draw_gauge(adapter, 2, seed=9, kind="permutation")
    for q in perm[0].values():
        assert set(q.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(q.sum(0), torch.ones(4, dtype=q.dtype))
        assert torch.equal(q.sum(1), torch.ones(4, dtype=q.dtype))
    ident = draw_gauge(adapter, 2, seed=9, kind="none")
    assert torch.equal(ident[1][P1], torch.eye(4, dtype=torch.float64))
    again = draw_gauge(adapter, 3, seed=9)
    assert all(torch.equal(orth[k][p], again[k][p]) for k in range(3) for p in orth[k])
    with pytest.raises(ValueError, match="unknown gauge kind"):
        draw_gauge(adapter, 2, seed=0, kind="rotation")


def test_haar_matrix_is_the_positive_diagonal_qr_factor():
    # Q·diag(sign(diag(R))) is the orthogonal factor whose R has a positive
    # diagonal, i.e. classical Gram-Schmidt of the columns of the Gaussian draw
    # (an independent construction, in numpy).
    from fed_unlearn.mpu_ops import _generator

    adapter = _adapter(r=5)
    gauges = draw_gauge(adapter, 3, seed=21)
    for k in range(3):
        for prefix in (P0, P1):
            gen = _generator(21, "gauge", prefix, k)
            x = torch.randn(5, 5, generator=gen, dtype=torch.float64).numpy()
            q = np.zeros_like(x)
            for j in range(5):
                v = x[:, j] - q[:, :j] @ (q[:, :j].T @ x[:, j])
                q[:, j] = v / np.linalg.norm(v)
            np.testing.assert_allclose(gauges[k][prefix].numpy(), q, atol=1e-10)


def test_gauge_inverse_on_differences():
    a, b = _adapter(1), _adapter(2)
    for kind in ("orthogonal", "permutation"):
        q = draw_gauge(a, 2, seed=4, kind=kind)[1]
        ga, gb = apply_gauge(a, q), apply_gauge(b, q)
        assert torch.equal(ga[NORM], a[NORM])  # non-LoRA key untouched
        back = invert_gauge(sub(ga, gb), q)
        for key, want in sub(a, b).items():
            torch.testing.assert_close(back[key], want, rtol=0, atol=1e-6)
        for ka, kb in lora_pairs(a).values():  # B'A' == BA
            torch.testing.assert_close(
                ga[kb] @ ga[ka], a[kb] @ a[ka], rtol=1e-5, atol=1e-6
            )


def test_gauge_errors():
    a = _adapter()
    q = draw_gauge(a, 2, seed=0)[0]
    with pytest.raises(ValueError, match="no Q for"):
        apply_gauge(a, {P0: q[P0]})
    with pytest.raises(ValueError, match="expected"):
        apply_gauge(a, {P0: q[P0], P1: torch.eye(3)})
    bad = dict(a)
    bad[f"{P0}.lora_B.weight"] = torch.zeros(24, 5)
    with pytest.raises(ValueError, match="not \\[r, in\\]"):
        draw_gauge(bad, 2, seed=0)


@pytest.mark.parametrize("kind", ["orthogonal", "permutation"])
def test_gauge_keeps_model_output(tiny_model_dir, kind):
    from fed_unlearn.models import LoraSpec, get_adapter, load_lora_model, set_adapter

    model, _ = load_lora_model(tiny_model_dir, LoraSpec(r=4), cache=False)
    gen = torch.Generator().manual_seed(0)
    state = {
        k: 0.3 * torch.randn(v.shape, generator=gen)
        for k, v in get_adapter(model).items()
    }
    set_adapter(model, state)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=gen)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert float((before - base).abs().max()) > 1e-2  # the adapter matters (B != 0)

    q = draw_gauge(state, 2, seed=5, kind=kind)[0]
    assert any(not torch.equal(m, torch.eye(4, dtype=m.dtype)) for m in q.values())
    gauged = apply_gauge(state, q)
    assert any(not torch.allclose(gauged[k], state[k]) for k in state)
    set_adapter(model, gauged)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert float((after - before).abs().max()) <= 1e-5


# --------------------------------------------------------------------------- merge
def test_harmonic_merge_golden():
    d1 = {"x": torch.tensor([1.0, 2.0])}
    d2 = {"x": torch.tensor([4.0, -2.0])}
    # weights 1/1 and 1/2 -> (1·d1 + 0.5·d2) / 1.5
    out = harmonic_merge([d1, d2], (1.0, 2.0))
    torch.testing.assert_close(out["x"], torch.tensor([2.0, 2.0 / 3.0]))
    with pytest.raises(ValueError, match="3 alphas for m=2"):
        harmonic_merge([d1, d2], (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="keys differ"):
        harmonic_merge([d1, {"y": torch.ones(2)}], (1.0, 2.0))
    with pytest.raises(ValueError, match="shape"):
        harmonic_merge([d1, {"x": torch.ones(3)}], (1.0, 2.0))


def _linear_client_map(seed: int):
    """Δ(θ) = Lθ + c, with L gauge-equivariant (A ↦ 0.3A + A M, B ↦ N B - 0.2B)."""
    gen = torch.Generator().manual_seed(seed)
    theta = _adapter(seed)
    pairs = lora_pairs(theta)
    mats = {}
    for ka, kb in pairs.values():
        mats[ka] = 0.1 * torch.randn(
            theta[ka].shape[1], theta[ka].shape[1], generator=gen
        )
        mats[kb] = 0.1 * torch.randn(
            theta[kb].shape[0], theta[kb].shape[0], generator=gen
        )
    const = {k: torch.randn(v.shape, generator=gen) for k, v in theta.items()}
    a_keys = {ka for ka, _ in pairs.values()}
    b_keys = {kb for _, kb in pairs.values()}

    def linear(state):
        out = {}
        for k, v in state.items():
            if k in a_keys:
                out[k] = 0.3 * v + v @ mats[k]  # commutes with A -> Q A
            elif k in b_keys:
                out[k] = mats[k] @ v - 0.2 * v  # commutes with B -> B Qᵀ
            else:
                out[k] = 0.5 * v
        return out

    return theta, linear, const


@pytest.mark.parametrize("gauge", ["orthogonal", "permutation", "none"])
def test_harmonic_merge_is_exact_for_a_linear_client(gauge):
    theta, linear, const = _linear_client_map(3)
    secrets = draw_secrets(3, "linear", seed=0)  # alphas 1, 1.5, 2
    copies, rnd = prepare_copies(theta, 3, 0.2, secrets, gauge=gauge)
    # The client only sees gauge coordinates: it applies the equivariant linear
    # part to its copy; the constant part is the original-coordinate constant as
    # seen in that copy's coordinates.
    returned = []
    for cp, q in zip(copies, rnd.gauges, strict=True):
        lin, shift = linear(cp), apply_gauge(const, q)
        returned.append({k: lin[k] + shift[k] for k in cp})
    want = {k: v + const[k] for k, v in linear(theta).items()}
    copies, _ = unpack_copies(pack_copies(returned))  # through the wire format
    merged = merge_returned(copies, rnd, theta)
    for key in theta:
        torch.testing.assert_close(merged[key], want[key], rtol=0, atol=1e-5)
    # naive uniform averaging of the un-gauged deltas keeps first-order noise
    back = [invert_gauge(r, q) for r, q in zip(returned, rnd.gauges, strict=True)]
    naive = harmonic_merge(back, (1.0, 1.0, 1.0))
    worst = max(float((naive[k] - want[k]).abs().max()) for k in theta)
    assert worst > 1e-3


def test_prepare_copies_structure():
    theta = _adapter(4)
    secrets = draw_secrets(2, seed=1)
    copies, rnd = prepare_copies(theta, 2, 0.1, secrets)
    assert rnd.m == 2 and rnd.alphas == secrets.alphas
    assert str(secrets.alphas[1]) not in repr(rnd)
    eps = zero_sum_noise(theta, 2, 0.1, secrets.alphas, secrets.noise_seed)
    for k, cp in enumerate(copies):
        assert list(cp) == list(theta)
        assert all(cp[key].shape == theta[key].shape for key in theta)
        noisy = {key: theta[key] + eps[k][key] for key in theta}
        for ka, kb in lora_pairs(theta).values():  # function = that of θ + ε_k
            torch.testing.assert_close(
                cp[kb] @ cp[ka], noisy[kb] @ noisy[ka], rtol=1e-5, atol=1e-6
            )
        torch.testing.assert_close(cp[NORM], noisy[NORM])
    again, _ = prepare_copies(theta, 2, 0.1, secrets)
    assert all(torch.equal(again[1][key], copies[1][key]) for key in theta)
    # κ = 0 and no gauge: the copies are θ itself
    plain, _ = prepare_copies(theta, 2, 0.0, secrets, gauge="none")
    assert all(torch.equal(plain[1][key], theta[key]) for key in theta)
    with pytest.raises(ValueError, match="m=3 but the secrets hold 2"):
        prepare_copies(theta, 3, 0.1, secrets)
    with pytest.raises(ValueError, match="kappa"):
        prepare_copies(theta, 2, -1.0, secrets)


# ------------------------------------------------------------------ bad returns
def _round():
    theta = _adapter(5)
    copies, rnd = prepare_copies(theta, 3, 0.05, draw_secrets(3, seed=2))
    deltas = [{k: 0.01 * torch.ones_like(v) for k, v in c.items()} for c in copies]
    return theta, rnd, deltas


def test_merge_returned_rejects_bad_deltas():
    theta, rnd, deltas = _round()
    merge_returned(deltas, rnd, theta)  # fine as is
    key = f"{P1}.lora_B.weight"
    with pytest.raises(ValueError, match="expected 3 returned deltas, got 2"):
        merge_returned(deltas[:2], rnd, theta)
    missing = [dict(d) for d in deltas]
    del missing[1][key]
    with pytest.raises(InvalidUpdateError, match=f"copy 1: .*missing 1 key.*{key}"):
        merge_returned(missing, rnd, theta)
    extra = [dict(d) for d in deltas]
    extra[2]["surprise.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="copy 2: .*unexpected key.*surprise.weight"):
        merge_returned(extra, rnd, theta)
    shaped = [dict(d) for d in deltas]
    shaped[0][key] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=f"copy 0: .*{key}.*shape mismatch"):
        merge_returned(shaped, rnd, theta)
    nan = [dict(d) for d in deltas]
    nan[1][NORM] = torch.full_like(nan[1][NORM], float("nan"))
    with pytest.raises(ValueError, match=f"copy 1: .*{NORM}.*NaN"):
        merge_returned(nan, rnd, theta)
    with pytest.raises(ValueError, match="list of 3 deltas"):
        merge_returned(dict(enumerate(deltas)), rnd, theta)


def test_merge_with_zero_deltas_is_zero_and_matches_manual():
    theta, rnd, deltas = _round()
    zeros = [{k: torch.zeros_like(v) for k, v in d.items()} for d in deltas]
    out = merge_returned(zeros, rnd, theta)
    assert all(float(v.abs().max()) == 0.0 for v in out.values())
    manual = harmonic_merge(
        [invert_gauge(d, q) for d, q in zip(deltas, rnd.gauges, strict=True)],
        rnd.alphas,
    )
    merged = merge_returned(deltas, rnd, theta)
    for key in theta:
        torch.testing.assert_close(merged[key], manual[key])
    w = np.array([1 / a for a in rnd.alphas])
    w /= w.sum()
    a_key = f"{P0}.lora_A.weight"
    by_hand = sum(
        wk * (q[P0].T @ d[a_key].double())
        for wk, q, d in zip(w, rnd.gauges, deltas, strict=True)
    )
    torch.testing.assert_close(merged[a_key].double(), by_hand, rtol=1e-6, atol=1e-7)
