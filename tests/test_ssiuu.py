"""Ssiuu: the attribution regulariser, the method, and the attribution diagnostics."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Context, RecordDict
from helpers import E2E_BASE, adapter_state, full_context, run_cli

from fed_unlearn.data.qa import collate
from fed_unlearn.losses import unlearn_train
from fed_unlearn.losses.attribution_reg import (
    AttributionRegulariser,
    AttributionSpec,
    NeuronTap,
    answer_positions,
    attribution_from,
    model_attribution,
    penalty_terms,
    reference_attributions,
)
from fed_unlearn.methods import get_method
from fed_unlearn.metrics.attribution import neuron_summary
from fed_unlearn.models import (
    LoraSpec,
    get_adapter,
    init_adapter,
    load_lora_model,
    prompt_formatter,
    set_adapter,
)
from fed_unlearn.protocol import LocalUpdateRequest, ProtocolError
from fed_unlearn.training import TrainSpec, encode_items

# ----------------------------------------------------------------- toy network
# h = W1 x (the "neurons"), log p = Σ_n w2_n · f(h_n): A_n = h_n · w2_n · f'(h_n)


def _toy(w1, w2, x, f=lambda h: h):
    h = (w1 @ x).view(1, 1, -1)  # [B=1, T=1, N]
    return h, (w2 * f(h.view(-1))).sum()


def test_attribution_sign_is_the_readout_sign_by_construction():
    """With a linear read-out and positive activations, A_n = h_n·w2_n: its sign
    is w2_n's. h = [1, 2, 3], w2 = [2, -1, 0.5] -> A = [2, -2, 1.5] by hand;
    then R_b = mean ReLU(-A) = 2/3 and, against A^0 = [1, -0.5, 1],
    R_a = mean ReLU(-A - ReLU(-A^0)) = mean [0, 1.5, 0] = 0.5."""
    w1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    w2 = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
    x = torch.tensor([1.0, 2.0])
    h, logp = _toy(w1, w2, x)
    att = attribution_from([h], logp, torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(att, torch.tensor([[2.0, -2.0, 1.5]]))
    assert torch.equal(att.sign(), w2.detach().sign().view(1, -1))
    assert float(penalty_terms(att).mean()) == pytest.approx(2 / 3)
    ref = torch.tensor([[1.0, -0.5, 1.0]])
    assert penalty_terms(att, ref).tolist() == [[0.0, 1.5, 0.0]]
    assert float(penalty_terms(att, ref).mean()) == pytest.approx(0.5)
    # at the reference itself, variant (a) is 0 whatever its signs
    assert float(penalty_terms(ref, ref).abs().sum()) == 0.0


def test_positions_that_predict_no_answer_token_are_left_out():
    """Two positions, only the first predicts an answer token (label at t+1):
    the second position's activation never counts."""
    labels = torch.tensor([[-100, 7, -100]])
    pos = answer_positions(labels)
    assert pos.tolist() == [[True, False, False]]
    w = torch.tensor([2.0, -3.0], requires_grad=True)
    h = torch.stack([w, 5 * w, w]).unsqueeze(0)  # [1, 3, 2]
    logp = (h * torch.tensor([1.0, -1.0])).sum()  # ∂logp/∂h = ±1 at every t
    att = attribution_from([h], logp, pos)
    torch.testing.assert_close(att, torch.tensor([[2.0, 3.0]]))  # only t = 0


def test_variants_differ_exactly_where_the_reference_is_negative():
    g = torch.Generator().manual_seed(3)
    att = -(torch.rand(6, 50, generator=g) + 0.1)  # every attribution negative
    ref = torch.randn(6, 50, generator=g)
    a, b = penalty_terms(att, ref), penalty_terms(att)
    assert torch.equal(a != b, ref < 0)
    assert torch.equal(a[ref >= 0], b[ref >= 0])
    torch.testing.assert_close(a[ref < 0], torch.relu(-att + ref)[ref < 0])
    with pytest.raises(ValueError, match="shape"):
        penalty_terms(att, ref[:3])


def _penalty(w1, w2, x, graph):
    h, logp = _toy(w1, w2, x, torch.tanh)
    return penalty_terms(attribution_from([h], logp, torch.ones(1, 1).bool(), graph))


def test_surrogate_gradient_flows_only_through_the_activations():
    """log p = Σ w2·tanh(h): the surrogate detaches g = w2·sech²(h), so w2 (which
    only reaches A through g) gets no gradient, and W1 gets the hand value
    dR/dW1[n] = -(1/N)·[A_n < 0]·g_n·x; the exact version moves w2 too."""
    w1 = torch.tensor([[0.5, -0.2], [0.3, 0.4], [-0.6, 0.1]], requires_grad=True)
    w2 = torch.tensor([1.5, -2.0, 0.7], requires_grad=True)
    x = torch.tensor([1.0, 2.0])
    r = _penalty(w1, w2, x, "surrogate").mean()
    gw1, gw2 = torch.autograd.grad(r, [w1, w2], allow_unused=True)
    assert gw2 is None or float(gw2.abs().max()) == 0.0
    h = (w1 @ x).detach()
    gv = w2.detach() / torch.cosh(h) ** 2
    neg = (h * gv < 0).float()
    want = -(neg * gv).unsqueeze(1) * x.unsqueeze(0) / 3
    torch.testing.assert_close(gw1, want)
    assert neg.sum() > 0  # the case is not vacuous
    r_exact = _penalty(w1, w2, x, "exact").mean()
    _, gw2_exact = torch.autograd.grad(r_exact, [w1, w2])
    assert float(gw2_exact.abs().max()) > 1e-3


def test_exact_gradient_matches_a_finite_difference():
    torch.manual_seed(0)
    w1 = torch.tensor([[0.5, -0.2], [0.3, 0.4], [-0.6, 0.1]], dtype=torch.float64)
    w2 = torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    p1, p2 = w1.clone().requires_grad_(True), w2.clone().requires_grad_(True)
    g1, g2 = torch.autograd.grad(_penalty(p1, p2, x, "exact").mean(), [p1, p2])

    def value(a, b):
        a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        return float(_penalty(a, b, x, "none").mean())

    eps = 1e-6
    for grad, which in ((g1, 0), (g2, 1)):
        fd = torch.zeros_like(grad)
        for i in range(grad.numel()):
            plus, minus = [w1.clone(), w2.clone()], [w1.clone(), w2.clone()]
            plus[which].view(-1)[i] += eps
            minus[which].view(-1)[i] -= eps
            fd.view(-1)[i] = (value(*plus) - value(*minus)) / (2 * eps)
        torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------- on a tiny Llama


@pytest.fixture
def lora(tiny_model_dir):
    model, tok = load_lora_model(tiny_model_dir, LoraSpec(r=4, alpha=8), cache=False)
    set_adapter(model, init_adapter(model, 0))
    return model, tok, prompt_formatter(tok)


def test_batched_attribution_equals_one_item_at_a_time(lora, items):
    """Items of a padded batch do not interact: the batch's per-item rows equal
    each item attributed alone (its own gradient, no padding)."""
    model, tok, pf = lora
    enc = encode_items(tok, pf, items[:4], 64)
    model.eval()
    with NeuronTap.of(model) as tap:
        batch = model_attribution(model, collate(enc, int(tok.pad_token_id)), tap)
        alone = torch.cat(
            [
                model_attribution(model, collate([e], int(tok.pad_token_id)), tap)
                for e in enc
            ]
        )
    n_neurons = 2 * 64  # 2 layers x intermediate_size 64
    assert batch.shape == (4, n_neurons)
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-7)
    assert float(batch.abs().max()) > 0


def test_exact_regulariser_matches_a_finite_difference_on_the_model(lora, items):
    """The exact R (through attention's double backward on the math kernel)
    against central differences on two LoRA entries; the surrogate's gradient
    is not R's. The model runs in float64, but Llama's RMSNorm computes in
    float32, so the step is 1e-2 (smaller steps drown in its rounding)."""
    model, tok, pf = lora
    model.double().eval()
    batch = collate(encode_items(tok, pf, items[:3], 64), int(tok.pad_token_id))
    ref = reference_attributions(model, tok, pf, items[:3], 64)
    params = [p for n, p in model.named_parameters() if "lora_B" in n][:2]

    def grads(exact):
        reg = AttributionRegulariser(
            model, AttributionSpec(1.0, "negative", exact), ref
        )
        with reg:
            return torch.autograd.grad(reg(batch, [0, 1, 2]), params)

    exact, surrogate = grads(True), grads(False)
    reg = AttributionRegulariser(model, AttributionSpec(1.0, "negative"), ref)
    eps = 1e-2
    with reg:
        for p, g, s in zip(params, exact, surrogate, strict=True):
            values = []
            for step in (eps, -2 * eps, eps):
                with torch.no_grad():
                    p.view(-1)[0] += step
                values.append(float(reg(batch, [0, 1, 2]).detach()))
            fd = (values[0] - values[1]) / (2 * eps)
            assert abs(fd) > 1e-6
            assert float(g.view(-1)[0]) == pytest.approx(fd, rel=0.05)
            assert abs(float(s.view(-1)[0]) - fd) > 0.2 * abs(fd)


def test_first_step_penalty_is_zero_against_its_own_reference(lora, items):
    """Variant (a) at θ^0 is 0 only if each batch row meets its own A^0 row: the
    first step's R checks the item indexing. The regulariser doubles the ga
    tokens (one more forward per batch) and moves the adapter."""
    model, tok, pf = lora
    spec = TrainSpec(epochs=1, batch_size=4, lr=1e-2, max_length=64)
    start = get_adapter(model)
    ref = reference_attributions(model, tok, pf, items, 64)
    plain = unlearn_train(model, tok, pf, items, "ga", spec, seed=0)
    set_adapter(model, start)
    reg = AttributionRegulariser(model, AttributionSpec(5.0, "increase"), ref)
    stats = unlearn_train(model, tok, pf, items, "ga", spec, seed=0, regulariser=reg)
    assert reg.penalties[0] == pytest.approx(0.0, abs=1e-4)
    assert len(reg.penalties) == stats.steps == plain.steps
    assert stats.tokens == 2 * plain.tokens
    neg = AttributionRegulariser(model, AttributionSpec(1.0, "negative"), ref)
    set_adapter(model, start)
    unlearn_train(model, tok, pf, items, "ga", spec, seed=0, regulariser=neg)
    assert neg.penalties[0] > 0  # (b) counts the original's negative part
    with pytest.raises(ValueError, match="cover 10 items, the forget set has 4"):
        unlearn_train(model, tok, pf, items[:4], "ga", spec, seed=0, regulariser=reg)


def test_client_keeps_its_reference_between_requests(lora, items):
    """The first request (attribution-reference=1) computes A^0 from the
    adapter it carries and keeps it; a later one reuses it, even after the
    adapter changed; a client without a kept A^0 refuses clearly."""
    from clients.unlearn import _attribution_regulariser

    model, tok, pf = lora
    spec = TrainSpec(epochs=1, batch_size=4, max_length=64)
    ctx = Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}
    )
    first = LocalUpdateRequest(
        copies=[adapter_state()],
        loss="ga",
        attribution_weight=1.0,
        attribution_reference=1,
    )
    reg1 = _attribution_regulariser(first, ctx, model, tok, pf, items, spec)
    want = reference_attributions(model, tok, pf, items, 64)
    torch.testing.assert_close(reg1.reference, want)
    set_adapter(model, init_adapter(model, 5))
    later = LocalUpdateRequest(
        copies=[adapter_state()], loss="ga", attribution_weight=1.0
    )
    reg2 = _attribution_regulariser(later, ctx, model, tok, pf, items, spec)
    torch.testing.assert_close(reg2.reference, want)
    fresh = Context(
        run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={}
    )
    with pytest.raises(ValueError, match="attribution-reference=1"):
        _attribution_regulariser(later, fresh, model, tok, pf, items, spec)


# --------------------------------------------------------- protocol and method


def test_attribution_fields_travel_and_bad_ones_are_refused():
    req = LocalUpdateRequest(
        copies=[adapter_state()],
        loss="npo",
        attribution_weight=2.0,
        attribution_variant="negative",
        attribution_exact=1,
        attribution_reference=1,
    )
    fields, arrays = req.to_fields()
    assert fields["attribution-weight"] == 2.0
    assert fields["attribution-variant"] == "negative"
    back = LocalUpdateRequest.from_fields(fields, arrays)
    assert (back.attribution_exact, back.attribution_reference) == (1, 1)
    plain, _ = LocalUpdateRequest(copies=[adapter_state()], loss="npo").to_fields()
    assert not any(k.startswith("attribution") for k in plain)
    one = [adapter_state()]
    for kwargs, match in (
        ({"loss": "ga", "attribution_variant": "negative"}, "needs 'attribution-w"),
        ({"loss": "nll", "attribution_weight": 1.0}, "not 'nll'"),
        ({"loss": "ga", "attribution_weight": 0.0}, "finite and > 0"),
        ({"loss": "ga", "attribution_weight": 1.0, "attribution_exact": 2}, "0 or 1"),
        (
            {"loss": "ga", "attribution_weight": 1.0, "attribution_variant": "x"},
            "must be one of",
        ),
    ):
        with pytest.raises(ProtocolError, match=match):
            LocalUpdateRequest(copies=one, **kwargs)
    with pytest.raises(ProtocolError, match="takes one copy"):
        LocalUpdateRequest(copies=one * 2, loss="ga", attribution_weight=1.0)


def test_ssiuu_asks_for_the_reference_only_in_its_first_round():
    trained = adapter_state()
    ctx, _, _ = full_context(trained)
    opts = {"rounds": 3, "reg_weight": 0.5, "variant": "negative", "exact": True}
    res = get_method("ssiuu", {**opts, "interleave_recovery": False}).unlearn(ctx)
    sent = [cfg for _, cfg in ctx.clients.calls]
    assert [c["attribution-reference"] for c in sent] == [1, 0, 0]
    assert all(c["attribution-weight"] == 0.5 for c in sent)
    assert all(c["attribution-variant"] == "negative" for c in sent)
    assert all(c["attribution-exact"] == 1 and c["loss"] == "npo" for c in sent)
    assert [c for c, _ in ctx.clients.calls] == [(1,)] * 3
    assert res.info["variant"] == "negative" and res.rounds == 3
    # the update rule is local_unlearn's: same adapter for the same rounds
    ctx2, _, _ = full_context(trained)
    base = get_method(
        "local_unlearn", {"rounds": 3, "interleave_recovery": False}
    ).unlearn(ctx2)
    for k in trained:
        torch.testing.assert_close(res.adapter[k], base.adapter[k])


def test_ssiuu_options_are_checked():
    with pytest.raises(ValueError, match="variant must be one of"):
        get_method("ssiuu", {"variant": "both"})
    with pytest.raises(ValueError, match="finite and > 0"):
        get_method("ssiuu", {"reg_weight": 0})
    with pytest.raises(KeyError, match="unknown inner loss"):
        get_method("ssiuu", {"inner_loss": "nope"})
    assert get_method("ssiuu", {"inner_loss": "gd"}).config.inner_loss == "gd"


# ------------------------------------------------------------------ diagnostics


def test_neuron_summary_by_hand():
    """Two items, four neurons; means Ā^orig = [1, -1, 0.5, 2] (unit = 1.125),
    Ā^un = [-2, -1, 0.5, 0]. τ = 1 x 1.125: neuron 0 went from >= 0 to -2 <
    -1.125 (turned negative); neuron 1 was negative already."""
    orig = torch.tensor([[2.0, -1.0, 0.0, 2.0], [0.0, -1.0, 1.0, 2.0]])
    un = torch.tensor([[-2.0, -2.0, 0.5, 0.0], [-2.0, 0.0, 0.5, 0.0]])
    out = neuron_summary({"original": orig, "unlearned": un}, tau=1.0, bins=4)
    assert out["spec"]["unit"] == pytest.approx(1.125)
    assert out["spec"]["tau_abs"] == pytest.approx(1.125)
    assert out["edges"] == [-2.0, -1.0, 0.0, 1.0, 2.0]
    o, u = out["models"]["original"], out["models"]["unlearned"]
    assert (o["positive_mass"], o["negative_mass"]) == (3.5, 1.0)
    assert (u["positive_mass"], u["negative_mass"]) == (0.5, 3.0)
    assert u["negative_share"] == pytest.approx(3 / 3.5)
    assert (o["turned_negative"], u["turned_negative"]) == (0, 1)
    assert (o["negative_neurons"], u["negative_neurons"]) == (0, 1)
    # bins [-2,-1), [-1,0), [0,1), [1,2]: the end bins hold the edges' values
    assert o["histogram"] == [0, 1, 1, 2]
    assert u["histogram"] == [1, 1, 2, 0]
    with pytest.raises(ValueError, match="before unlearning"):
        neuron_summary({"unlearned": un}, tau=1.0)


def test_report_shows_the_attribution_section(tmp_path):
    from fed_unlearn.report import write_report

    orig = torch.tensor([[2.0, -1.0, 0.0, 2.0]])
    un = torch.tensor([[-2.0, -2.0, 0.5, 0.0]])
    summary = {"forget_Q_A_Prob": 0.5, "model_utility": 0.6}
    run = {
        "method": "ssiuu",
        "config": {"preset": "tiny", "method": "ssiuu", "num-clients": 3},
        "summary": {"original": summary, "unlearned": summary, "retrain": summary},
        "attribution": neuron_summary(
            {"original": orig, "unlearned": un, "retrain": orig}, tau=1.0
        ),
    }
    d = tmp_path / "a"
    d.mkdir()
    (d / "run.json").write_text(json.dumps(run))
    md = write_report([d], tmp_path / "rep").read_text()
    # unit = mean |orig| = 1.25 = τ: neuron 0 (2 -> -2) turned negative
    assert "## Neuron attribution" in md
    assert "| ssiuu | 1 | 2 | 0.5 | 4 | 0.889 |" in md
    assert "| *original* | 0 | 0 | 4 | 1 | 0.2 |" in md
    assert (tmp_path / "rep" / "attribution_histograms.png").is_file()
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "<h2>Neuron attribution</h2>" in html


@pytest.mark.slow
def test_cli_ssiuu_runs_end_to_end_with_the_diagnostics(tmp_path):
    out = tmp_path / "run"
    run_cli(
        [
            "run",
            *E2E_BASE,
            "--method",
            "ssiuu",
            "--set",
            "eval-attribution=true",
            "--out",
            str(out),
            "--quiet",
        ],
        tmp_path,
    )
    run = json.loads((out / "run.json").read_text())
    rounds = run["unlearn_info"]["rounds"]
    assert rounds and all(r["attribution_penalty"] >= 0 for r in rounds)
    models = run["attribution"]["models"]
    assert set(models) == {"original", "unlearned", "retrain"}
    assert models["original"]["turned_negative"] == 0
    assert (
        sum(models["unlearned"]["histogram"]) == run["attribution"]["spec"]["neurons"]
    )
