"""SFU: Gram-matrix bases, the projection on LoRA A, the method by hand."""

from __future__ import annotations

import pytest
import torch
from helpers import adapter_state, full_context

from fed_unlearn.methods import get_method
from fed_unlearn.methods.sfu import summed_grams
from fed_unlearn.protocol import LayerGramReply, LayerGramRequest, LocalUpdateRequest
from fed_unlearn.subspace import energy_basis, layer_input_grams, project_off

A, B = "m.lora_A.weight", "m.lora_B.weight"


def _svd_basis(r: torch.Tensor, eps: float) -> torch.Tensor:
    """The spec's energy_basis on the stacked inputs (an independent formula)."""
    u, s, _ = torch.linalg.svd(r.double(), full_matrices=False)
    e = (s**2).cumsum(0) / (s**2).sum()
    return u[:, : int((e < eps).sum()) + 1]


@pytest.mark.parametrize("eps", [0.5, 0.9, 0.97, 1.0])
def test_basis_of_summed_grams_is_the_svd_basis_of_stacked_inputs(eps):
    """Two clients' scaled inputs X_k diag(λ_k) X_kᵀ summed span what the SVD of
    R = [X_1 √λ_1, X_2 √λ_2] spans, with the same energy cut (same projector)."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(8, n, generator=g, dtype=torch.float64) for n in (4, 3)]
    lams = [torch.rand(n, generator=g, dtype=torch.float64) + 0.1 for n in (4, 3)]
    gram = sum(x @ torch.diag(lam) @ x.T for x, lam in zip(xs, lams, strict=True))
    stacked = torch.cat([x * lam.sqrt() for x, lam in zip(xs, lams, strict=True)], 1)
    got, want = energy_basis(gram, eps), _svd_basis(stacked, eps)
    assert got.shape == want.shape
    torch.testing.assert_close(got @ got.T, want @ want.T, atol=1e-8, rtol=0)
    if eps == 1.0:
        assert got.shape[1] == 7  # the rank of 7 inputs in R^8


def test_projection_removes_exactly_the_basis_component():
    """U = e_1: ΔA (I − e_1 e_1ᵀ) zeroes ΔA's first column and keeps the rest;
    in general ΔA − ΔÃ = ΔA U Uᵀ and ΔÃ x = 0 for every x in span(U)."""
    da = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = project_off(da, torch.tensor([[1.0], [0.0]]))
    assert torch.equal(out, torch.tensor([[0.0, 2.0], [0.0, 4.0]]))
    g = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64))[0]
    da = torch.randn(3, 6, generator=g, dtype=torch.float64)
    out = project_off(da, u)
    torch.testing.assert_close(da - out, da @ u @ u.T)
    x = u @ torch.tensor([0.3, -2.0], dtype=torch.float64)
    torch.testing.assert_close(out @ x, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="d_in"):
        project_off(da, u[:4])


def _projector_off(a0: torch.Tensor) -> torch.Tensor:
    """I − P for P the orthogonal projector onto the row space of ``a0``."""
    a0 = a0.double()
    p = a0.T @ torch.linalg.pinv(a0 @ a0.T) @ a0
    return torch.eye(a0.shape[1], dtype=torch.float64) - p


def test_sfu_projects_the_ascent_update_of_a_off_the_remaining_subspace():
    """Remaining client 0's Gram matrix is A_0ᵀ A_0 (LinearClients), of rank 2:
    with ε = 0.999 the basis spans A_0's rows (float32 rounding holds ~1e-7 of
    the energy). The departed client's ascent update of A is −0.5 (A_1 − A);
    SFU applies it times I − P; B stays (b_update="drop")."""
    trained = adapter_state()
    ctx, _, _ = full_context(trained)
    res = get_method("sfu", {"energy": 0.999}).unlearn(ctx)
    t = ctx.clients.targets
    step = -0.5 * (t[1][A] - trained[A]).double() @ _projector_off(t[0][A])
    torch.testing.assert_close(res.adapter[A], (trained[A] + step).float())
    torch.testing.assert_close(res.adapter[B], trained[B])
    grams, ascent = ctx.clients.requests
    assert list(grams) == [0] and isinstance(grams[0], LayerGramRequest)
    req = ascent[1]
    assert list(ascent) == [1] and isinstance(req, LocalUpdateRequest)
    assert req.loss == "ga" and set(req.copies[0]) == {A} and set(req.base) == {A, B}
    # the update no longer moves the remaining client's inputs (A_0's rows)
    moved = (res.adapter[A] - trained[A]).double() @ t[0][A].double().T
    torch.testing.assert_close(moved, torch.zeros_like(moved), atol=1e-5, rtol=0)
    assert res.rounds == 1 and res.info["basis_dims"]["max"] == 2


def test_keep_applies_bs_ascent_update_unprojected_and_recovery_follows():
    trained = adapter_state()
    ctx, _, _ = full_context(trained)
    opts = {"energy": 0.999, "b_update": "keep"}
    res = get_method("sfu", opts).unlearn(ctx)
    t = ctx.clients.targets
    torch.testing.assert_close(
        res.adapter[B], trained[B] - 0.5 * (t[1][B] - trained[B])
    )
    ctx2, _, _ = full_context(trained)
    rec = get_method("sfu", {**opts, "recovery_rounds": 1}).unlearn(ctx2)
    # one FedAvg round of client 0: x + 0.5 (t_0 − x)
    for k in trained:
        want = res.adapter[k] + 0.5 * (t[0][k] - res.adapter[k])
        torch.testing.assert_close(rec.adapter[k], want)
    assert rec.rounds == 2 and list(ctx2.clients.requests[-1]) == [0]


def test_bad_gram_replies_and_options_are_refused():
    theta = adapter_state()

    def rep(grams):
        return {3: LayerGramReply(grams, num_examples=10, tokens=40)}

    with pytest.raises(ValueError, match="client 3.*unexpected"):
        summed_grams(rep({"x.lora_A.weight": torch.eye(4)}), theta)
    with pytest.raises(ValueError, match=r"client 3.*shape \(3, 3\)"):
        summed_grams(rep({A: torch.eye(3)}), theta)
    with pytest.raises(ValueError, match="not symmetric"):
        summed_grams(rep({A: torch.triu(torch.ones(4, 4))}), theta)
    with pytest.raises(ValueError, match="not finite"):
        summed_grams(rep({A: torch.full((4, 4), float("nan"))}), theta)
    got = summed_grams(
        {**rep({A: torch.eye(4)}), 5: rep({A: 2 * torch.eye(4)})[3]}, theta
    )
    torch.testing.assert_close(got[A], 3 * torch.eye(4, dtype=torch.float64))
    for opt, bad in (
        ("energy", 0.0),
        ("energy", 1.5),
        ("b_update", "x"),
        ("max_items", -1),
    ):
        with pytest.raises(ValueError, match=opt):
            get_method("sfu", {opt: bad})


def test_layer_grams_sum_the_scaled_inputs_of_every_lora_a(tiny_model_dir, items):
    """An independent capture (the input of each adapted base layer, which LoRA A
    shares with dropout 0) with the same λ stream gives the same matrices; padding
    tokens are left out."""
    from fed_unlearn.data.qa import collate, encode_qa
    from fed_unlearn.models import LoraSpec, load_lora_model, prompt_formatter

    model, tok = load_lora_model(tiny_model_dir, LoraSpec(r=4, alpha=8), cache=False)
    fmt = prompt_formatter(tok)
    few = items[:5]
    grams, tokens = layer_input_grams(
        model, tok, fmt, few, 64, torch.Generator().manual_seed(9), batch_size=5
    )
    enc = [encode_qa(tok, fmt(it.question), it.answer, 64) for it in few]
    batch = collate(enc, int(tok.pad_token_id))
    mask = batch["attention_mask"].bool()
    assert tokens == int(mask.sum()) < mask.numel()  # some padding
    lam = 1.0 - torch.rand(
        tokens, generator=torch.Generator().manual_seed(9), dtype=torch.float64
    )
    seen = {}

    def keep(name):
        def hook(_m, args):
            seen[name] = args[0].detach().double()[mask]

        return hook

    handles = [
        m.base_layer.register_forward_pre_hook(keep(name))
        for name, m in model.named_modules()
        if hasattr(m, "base_layer") and hasattr(m, "lora_A")
    ]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in handles:
        h.remove()
    assert len(grams) == len(seen) > 0
    for name, x in seen.items():
        key = f"{name}.lora_A.weight"
        want = (x * lam[:, None]).T @ x
        torch.testing.assert_close(grams[key].double(), want, rtol=1e-5, atol=1e-5)
