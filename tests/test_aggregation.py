from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_unlearn.adapters import lora_pairs
from fed_unlearn.aggregation import AGGREGATORS, fedavg, product_space_aggregate

PFX = "base_model.model.model.layers.0.self_attn.q_proj"
A = f"{PFX}.lora_A.weight"
B = f"{PFX}.lora_B.weight"
NORM = "base_model.model.model.norm.weight"  # a non-LoRA tensor


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


# ------------------------------------------------------------------ fedavg

# two clients, 2x2 tensors, weights 1 and 3:  expected = (c0 * 1 + c1 * 3) / 4
C0 = {"x": t([[1.0, 2.0], [3.0, 4.0]]), "y": t([[0.0, 4.0], [8.0, -4.0]])}
C1 = {"x": t([[5.0, 6.0], [7.0, 8.0]]), "y": t([[4.0, 0.0], [-8.0, 4.0]])}
# x: [[(1+15)/4, (2+18)/4], [(3+21)/4, (4+24)/4]]
EXPECTED_X = t([[4.0, 5.0], [6.0, 7.0]])
# y: [[(0+12)/4, (4+0)/4], [(8-24)/4, (-4+12)/4]]
EXPECTED_Y = t([[3.0, 1.0], [-4.0, 2.0]])


def test_fedavg_golden():
    out = fedavg([C0, C1], [1, 3])
    assert list(out) == ["x", "y"]
    assert torch.equal(out["x"], EXPECTED_X)
    assert torch.equal(out["y"], EXPECTED_Y)


@pytest.mark.parametrize("weights", [[2, 6], [0.25, 0.75], [100.0, 300.0]])
def test_fedavg_normalises_weights(weights):
    out = fedavg([C0, C1], weights)
    assert torch.equal(out["x"], EXPECTED_X)
    assert torch.equal(out["y"], EXPECTED_Y)


def test_fedavg_equal_weights_and_zero_weight():
    out = fedavg([C0, C1], [1, 1])
    assert torch.equal(out["x"], t([[3.0, 4.0], [5.0, 6.0]]))
    only_c1 = fedavg([C0, C1], [0, 5])
    assert torch.equal(only_c1["x"], C1["x"]) and torch.equal(only_c1["y"], C1["y"])


def test_fedavg_single_client_is_identity():
    out = fedavg([C0], [7])
    assert torch.equal(out["x"], C0["x"]) and torch.equal(out["y"], C0["y"])


def test_fedavg_keeps_dtype_and_does_not_modify_inputs():
    c0 = {"h": t([1.0, 2.0], torch.float16), "b": t([1.0], torch.bfloat16)}
    c1 = {"h": t([3.0, 6.0], torch.float16), "b": t([3.0], torch.bfloat16)}
    out = fedavg([c0, c1], [1, 1])
    assert out["h"].dtype == torch.float16 and out["b"].dtype == torch.bfloat16
    assert torch.equal(out["h"], t([2.0, 4.0], torch.float16))
    assert torch.equal(c0["h"], t([1.0, 2.0], torch.float16))


def test_fedavg_computes_in_float64():
    # (2**26 + 2 + 2 - 2**26) / 4 = 1; a float32 running sum gives 0 because
    # 2**24 + 0.5 rounds back to 2**24 in float32.
    states = [{"x": t([v])} for v in (2.0**26, 2.0, 2.0, -(2.0**26))]
    assert fedavg(states, [1, 1, 1, 1])["x"].item() == 1.0


def test_fedavg_errors():
    with pytest.raises(ValueError, match="empty"):
        fedavg([], [])
    with pytest.raises(ValueError, match="2 states but 1 weights"):
        fedavg([C0, C1], [1])
    with pytest.raises(ValueError, match="weight 1 is negative"):
        fedavg([C0, C1], [1, -1])
    with pytest.raises(ValueError, match="all weights are zero"):
        fedavg([C0, C1], [0, 0])
    with pytest.raises(ValueError, match="not finite"):
        fedavg([C0, C1], [1, float("nan")])
    with pytest.raises(ValueError, match=r"state 1 has different keys.*'y'"):
        fedavg([C0, {"x": C1["x"]}], [1, 1])
    with pytest.raises(ValueError, match=r"state 1: 'x' has shape \(3,\)"):
        fedavg([C0, {"x": torch.zeros(3), "y": C1["y"]}], [1, 1])
    with pytest.raises(ValueError, match="non-floating"):
        fedavg([{"i": torch.zeros(2, dtype=torch.int64)}], [1])


# ------------------------------------------------------------ product space


def lora(b, a, **extra):
    return {A: t(a), B: t(b), **{k: t(v) for k, v in extra.items()}}


def test_product_space_exact_when_sum_is_rank_one():
    # rank-1 clients with the same column space (B1 = 2 * B0): M has rank 1.
    c0 = lora(b=[[1.0], [2.0]], a=[[1.0, 0.0, 1.0]])  # B0A0 = [[1,0,1],[2,0,2]]
    c1 = lora(b=[[2.0], [4.0]], a=[[0.0, 1.0, 1.0]])  # B1A1 = [[0,2,2],[0,4,4]]
    # M = (B0A0 * 1 + B1A1 * 3) / 4
    m = t([[0.25, 1.5, 1.75], [0.5, 3.0, 3.5]])
    out = product_space_aggregate([c0, c1], [1, 3])
    assert out[B].shape == (2, 1) and out[A].shape == (1, 3)
    torch.testing.assert_close(out[B] @ out[A], m, rtol=0, atol=1e-6)


def test_product_space_rank_two_exact_and_differs_from_factor_average():
    c0 = lora(b=[[1.0], [2.0]], a=[[1.0, 0.0, 1.0]])  # B0A0 = [[1,0,1],[2,0,2]]
    c1 = lora(b=[[0.0], [1.0]], a=[[3.0, 1.0, 0.0]])  # B1A1 = [[0,0,0],[3,1,0]]
    # M = (B0A0 + B1A1) / 2, rank 2
    m = t([[0.5, 0.0, 0.5], [2.5, 0.5, 1.0]])
    out = product_space_aggregate([c0, c1], [1, 1], rank=2)
    assert out[B].shape == (2, 2) and out[A].shape == (2, 3)
    torch.testing.assert_close(out[B] @ out[A], m, rtol=0, atol=1e-6)

    # factor averaging: B̄ = [[0.5],[1.5]], Ā = [[2, 0.5, 0.5]]
    fa = fedavg([c0, c1], [1, 1])
    assert torch.equal(fa[B], t([[0.5], [1.5]]))
    assert torch.equal(fa[A], t([[2.0, 0.5, 0.5]]))
    # B̄Ā = [[1, 0.25, 0.25], [3, 0.75, 0.75]]  !=  M
    assert torch.equal(fa[B] @ fa[A], t([[1.0, 0.25, 0.25], [3.0, 0.75, 0.75]]))
    assert not torch.allclose(fa[B] @ fa[A], m)


def np_best_rank(m: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def random_clients(n, out_dim, in_dim, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            A: torch.randn(r, in_dim, generator=g),
            B: torch.randn(out_dim, r, generator=g),
            NORM: torch.randn(in_dim, generator=g),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize("rank", [None, 1, 3])
def test_product_space_truncation_is_best_rank_r(rank):
    out_dim, in_dim, r_in = 5, 7, 2  # non-square so a transpose would show
    states = random_clients(3, out_dim, in_dim, r_in, seed=1)
    w = [1.0, 2.0, 5.0]
    m = sum(
        wi / 8 * s[B].double().numpy() @ s[A].double().numpy()
        for wi, s in zip(w, states, strict=True)
    )
    assert np.linalg.matrix_rank(m) == 5  # 3 clients x rank 2 > 5 = min(out, in)
    r = r_in if rank is None else rank
    out = product_space_aggregate(states, w, rank=rank)
    assert out[B].shape == (out_dim, r)
    assert out[A].shape == (r, in_dim)
    assert out[A].dtype == torch.float32 and out[B].dtype == torch.float32
    got = (out[B].double() @ out[A].double()).numpy()
    np.testing.assert_allclose(got, np_best_rank(m, r), atol=1e-5)
    # balanced factors: both carry sqrt(S)
    s = np.linalg.svd(m, compute_uv=False)[:r]
    np.testing.assert_allclose(
        np.linalg.norm(out[B].numpy(), axis=0) ** 2, s, rtol=1e-5
    )
    np.testing.assert_allclose(
        np.linalg.norm(out[A].numpy(), axis=1) ** 2, s, rtol=1e-5
    )


def test_product_space_exact_when_rank_covers_sum_of_client_ranks():
    states = random_clients(2, 6, 8, 2, seed=2)
    m = sum(0.5 * s[B].double() @ s[A].double() for s in states)
    out = product_space_aggregate(states, [1, 1], rank=4)
    torch.testing.assert_close(out[B].double() @ out[A].double(), m, atol=1e-5, rtol=0)


def test_product_space_non_lora_tensors_get_fedavg():
    states = random_clients(2, 3, 4, 1, seed=3)
    out = product_space_aggregate(states, [1, 3])
    assert torch.equal(out[NORM], fedavg(states, [1, 3])[NORM])
    assert list(out) == list(states[0])


def test_product_space_rank_above_min_dim_is_zero_padded():
    c0 = lora(b=[[1.0], [2.0]], a=[[1.0, 0.0, 1.0]])
    c1 = lora(b=[[0.0], [1.0]], a=[[3.0, 1.0, 0.0]])
    out = product_space_aggregate([c0, c1], [1, 1], rank=4)
    assert out[B].shape == (2, 4) and out[A].shape == (4, 3)
    assert torch.all(out[B][:, 2:] == 0) and torch.all(out[A][2:] == 0)
    m = t([[0.5, 0.0, 0.5], [2.5, 0.5, 1.0]])
    torch.testing.assert_close(out[B] @ out[A], m, rtol=0, atol=1e-6)


def test_product_space_keeps_dtype():
    states = [
        {k: v.to(torch.bfloat16) for k, v in s.items()}
        for s in random_clients(2, 4, 4, 2)
    ]
    out = product_space_aggregate(states, [1, 1])
    assert all(v.dtype == torch.bfloat16 for v in out.values())


def test_product_space_errors():
    c = lora(b=[[1.0], [2.0]], a=[[1.0, 0.0, 1.0]])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rank"):
            product_space_aggregate([c], [1], rank=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unpaired"):
        product_space_aggregate([{A: t([[1.0, 2.0]])}], [1])
    with pytest.raises(ValueError, match=r"B \[out, r\] and A \[r, in\]"):
        product_space_aggregate([{A: t([[1.0, 2.0]]), B: t([[1.0, 2.0]])}], [1])
    with pytest.raises(ValueError, match="all weights are zero"):
        product_space_aggregate([c, c], [0, 0])
    with pytest.raises(ValueError, match="empty"):
        product_space_aggregate([], [])


def test_aggregators_registry():
    assert AGGREGATORS == {"fedavg": fedavg, "product_svd": product_space_aggregate}


def test_product_space_with_real_peft_keys():
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(6, 4, bias=False)

        def forward(self, x):
            return self.q_proj(x)

    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(Tiny(), cfg)
    w0 = model.base_model.model.q_proj.base_layer.weight.detach().clone()
    clients = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        sd = peft.get_peft_model_state_dict(model)
        clients.append({k: torch.randn(v.shape, generator=g) for k, v in sd.items()})
    agg = product_space_aggregate(clients, [1, 1], rank=4)
    assert lora_pairs(agg) == {
        "base_model.model.q_proj": (
            "base_model.model.q_proj.lora_A.weight",
            "base_model.model.q_proj.lora_B.weight",
        )
    }
    ((a_key, b_key),) = lora_pairs(agg).values()
    assert agg[b_key].shape == (4, 4) and agg[a_key].shape == (4, 6)

    # load the rank-2 aggregate into the model: delta weight = s * Σ w_i B_i A_i
    agg2 = product_space_aggregate(clients, [1, 1])
    peft.set_peft_model_state_dict(model, agg2)
    merged = model.merge_and_unload().q_proj.weight.detach()
    s = 4 / 2
    m = sum(0.5 * c[b_key] @ c[a_key] for c in clients)
    u, sv, vh = torch.linalg.svd(m.double())
    best2 = (u[:, :2] * sv[:2]) @ vh[:2]
    torch.testing.assert_close(merged - w0, (s * best2).float(), atol=1e-5, rtol=1e-5)
