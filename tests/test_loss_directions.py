"""Which way every inner unlearning loss moves a model, on toy cases.

Each loss of :data:`fed_unlearn.losses.LOSSES` runs through its registry step
(``LossSpec.step``: the batches it reads, the functional form it calls) on a tiny
position-wise language model; one plain SGD step on a term must move the model
the way the loss is meant to (open-unlearning @ d3d7cf9, the definitions quoted
in :mod:`fed_unlearn.losses.objectives`):

* forget terms of GA, GD, NPO, SimNPO, UnDIAL, WGA, SatImp and UCE lower the
  log-probability of the forget answers;
* IdkNLL raises the refusals' log-probability; IdkDPO raises the DPO margin of
  the refusal over the true answer (and, here, the refusal itself);
* every NLL retain term raises the retain answers' log-probability;
* RMU's forget term pulls the tapped activations towards the control vector and
  its retain term pulls the retain activations back to the reference's.

Every value is also checked against a hand computation (float64, written out
here, never through :mod:`fed_unlearn.losses.functional`), and the token-level
forget losses against the sign of their gradient on free logits.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fed_unlearn.losses import LOSSES, LayerTap
from fed_unlearn.losses.objectives import StepBatches, StepContext

VOCAB, DIM, SEED = 7, 5, 3
PROMPT = 2  # the first two positions of every row are the prompt (label -100)
FORGET = [[1, 2, 3, 4, 5], [2, 1, 5, 3, 6]]
IDK = [[1, 2, 0, 6, 4], [2, 1, 4, 0, 3]]  # same prompts, refusal answers
RETAIN = [[3, 6, 2, 1, 0], [5, 4, 1, 2, 6]]
ONE = [1, 2, 3]  # a one-token forget answer (token 3 after the prompt 1, 2)
LR = 0.05
NLL_RETAIN = sorted(n for n, s in LOSSES.items() if s.uses_retain and n != "rmu")


class _Toy(nn.Module):
    """Embedding -> two tanh blocks (``model.layers``, tappable) -> LM head."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(VOCAB, DIM)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh()) for _ in range(2)
        )
        self.head = nn.Linear(DIM, VOCAB)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        self.double()

    def hidden(self, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
        h = self.emb(input_ids)
        for block in self.model.layers[: layer + 1]:
            h = block(h)
        return h

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(self.hidden(input_ids, 1)))


class _StartWeights:
    """The reference model: the start weights swapped in (as FrozenReference
    does with the start adapter of a peft model), eval mode, no grad."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = {k: v.clone() for k, v in model.state_dict().items()}

    def run(self, fn):
        current = {k: v.clone() for k, v in self.model.state_dict().items()}
        with torch.no_grad():
            self.model.load_state_dict(self.state)
            try:
                return fn()
            finally:
                self.model.load_state_dict(current)


def _batch(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    ids = torch.tensor(rows)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _batches() -> StepBatches:
    return StepBatches(
        forget=_batch(FORGET),
        retain=_batch(RETAIN),
        idk=_batch(IDK),
        both=_batch(IDK + FORGET),
    )


def _setup(name: str, params: dict | None = None):
    """Toy model, loss spec and step context (the reference = the start weights)."""
    model = _Toy()
    spec = LOSSES[name]
    tap = LayerTap(model, 1) if spec.needs_hidden else None
    ref = _StartWeights(model) if spec.needs_reference else None
    ctx = StepContext(model, spec.resolve(params), SEED, ref, tap)
    return model, spec, ctx


# ------------------------------------------------------------ hand computations
def _token_logprobs(model, rows) -> list[list[torch.Tensor]]:
    """``log p(y_t)`` of every answer token of every row (float64 rows)."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor(rows)).logits.double(), -1)
    return [
        [lp[b, t - 1, row[t]] for t in range(PROMPT, len(row))]
        for b, row in enumerate(rows)
    ]


def _seq_logp(model, rows) -> list[float]:
    return [float(sum(r)) for r in _token_logprobs(model, rows)]


def _mean_nll(model, rows) -> float:
    toks = [float(v) for r in _token_logprobs(model, rows) for v in r]
    return -sum(toks) / len(toks)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _control(seed: int, coeff: float) -> torch.Tensor:
    """RMU's ``u = c·r/‖r‖``, ``r ~ U[0,1)^d`` from the call's seed."""
    r = torch.rand(DIM, generator=torch.Generator().manual_seed(seed)).double()
    return coeff * r / r.norm()


def _dist(h: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over rows of the mean over answer positions of mean_d (h - target)²."""
    d = (h.double() - target.double()).pow(2).mean(-1)[:, PROMPT:]
    return float(d.mean(-1).mean())


def _sgd(model: nn.Module, term: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    term.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    model.zero_grad(set_to_none=True)


def _forget_hand_value(name: str, model, params) -> float:
    """The forget term at the start (model = reference), written out by hand."""
    toks = _token_logprobs(model, FORGET)
    flat = [float(v) for r in toks for v in r]
    n = len(flat)
    if name in ("ga", "gd"):
        return sum(flat) / n  # -NLL_mean
    if name == "npo":  # log-ratio 0 for every row: -(2/β)·log σ(0)
        return -(2 / params["beta"]) * _log_sigmoid(0.0)
    if name == "simnpo":
        beta, delta = params["beta"], params["delta"]
        terms = [
            _log_sigmoid(beta * (-sum(float(v) for v in r) / len(r) - delta))
            for r in toks
        ]
        return -(2 / beta) * sum(terms) / len(terms)
    if name == "wga":
        return -sum(math.exp(lp) ** params["beta"] * -lp for lp in flat) / n
    if name == "satimp":
        b1, b2 = params["beta1"], params["beta2"]
        return (
            -sum(math.exp(lp) ** b1 * (1 - math.exp(lp)) ** b2 * -lp for lp in flat) / n
        )
    if name == "uce":
        return sum(-math.log(1 - math.exp(lp) / 2) for lp in flat) / n
    if name == "undial":
        with torch.no_grad():
            z = model(torch.tensor(FORGET)).logits.double()
        total = 0.0
        for b, row in enumerate(FORGET):
            for t in range(PROMPT, len(row)):
                zt = z[b, t - 1]
                q = torch.softmax(
                    zt
                    - params["beta"]
                    * nn.functional.one_hot(torch.tensor(row[t]), VOCAB).double(),
                    -1,
                )
                total += float(-(q * torch.log_softmax(zt, -1)).sum())
        return total / n
    raise AssertionError(name)


# ------------------------------------------------------------ forget terms
@pytest.mark.parametrize(
    "name", ["ga", "gd", "npo", "simnpo", "undial", "wga", "satimp", "uce"]
)
def test_forget_term_lowers_the_forget_answer(name):
    model, spec, ctx = _setup(name)
    forget, _ = spec.step(ctx, _batches())
    want = _forget_hand_value(name, model, ctx.params)
    assert float(forget.detach()) == pytest.approx(want, rel=1e-5, abs=1e-7)
    # direction: one answer token the toy model finds likely. (With several tokens
    # a token-weighted loss such as WGA may trade a rise of lightly weighted
    # tokens for a fall of heavy ones; one token has no such trade.)
    model, spec, ctx = _setup(name)
    before = _seq_logp(model, [ONE])[0]
    assert 0.5 < math.exp(before) < 0.95  # p ≈ 0.9: "learnt", not saturated
    _sgd(model, spec.step(ctx, StepBatches(forget=_batch([ONE])))[0])
    after = _seq_logp(model, [ONE])[0]
    assert after < before - 1e-5, (before, after)


def test_npo_value_away_from_the_reference_by_hand():
    """−(2/β)·mean log σ(−β·(log π − log π_ref)) once the model has moved."""
    model, spec, ctx = _setup("npo")
    ref = _seq_logp(model, FORGET)
    _sgd(model, spec.step(ctx, _batches())[0])  # the model is now below π_ref
    cur = _seq_logp(model, FORGET)
    beta = ctx.params["beta"]
    want = (
        -(2 / beta)
        * sum(_log_sigmoid(-beta * (c - r)) for c, r in zip(cur, ref, strict=True))
        / len(cur)
    )
    got = float(spec.step(ctx, _batches())[0].detach())
    assert got == pytest.approx(want, rel=1e-5)
    assert got < (2 / beta) * math.log(2)  # lower once π < π_ref: it was forgetting


@pytest.mark.parametrize("name", ["ga", "wga", "satimp", "uce", "undial"])
def test_token_loss_gradient_pushes_the_forget_token_down(name):
    """On free logits, ∂L/∂z_y > 0 at every scored position (a descent step
    lowers the forget token's logit) and one SGD step on the logits lowers p_y;
    GA's gradient is also checked by hand: (1 − p_y)/N at y, −p_v/N elsewhere."""
    from fed_unlearn.losses import functional as LF

    gen = torch.Generator().manual_seed(1)
    z = (torch.randn(2, 4, VOCAB, generator=gen) * 1.5).requires_grad_(True)
    labels = torch.tensor([[-100, 3, 1, 5], [-100, -100, 6, 2]])
    params = LOSSES[name].resolve()
    if name == "ga":
        loss = LF.ga_loss(z, labels)
    elif name == "wga":
        loss = LF.wga_loss(z, labels, params["beta"])
    elif name == "satimp":
        loss = LF.satimp_loss(z, labels, params["beta1"], params["beta2"])
    elif name == "uce":
        loss = LF.uce_token_loss(z, labels)
    else:  # UnDIAL at the start: the reference logits are the model's
        loss = LF.undial_loss(z, z.detach(), labels, params["beta"])
    loss.backward()
    scored = [(b, t, int(labels[b, t + 1])) for b in range(2) for t in range(3)]
    scored = [s for s in scored if s[2] != -100]
    probs = torch.softmax(z.detach().double(), -1)
    for b, t, y in scored:
        assert float(z.grad[b, t, y]) > 0, (b, t)
        if name == "ga":
            want = -probs[b, t] / len(scored)
            want[y] += 1 / len(scored)
            torch.testing.assert_close(
                z.grad[b, t].double(), want, rtol=1e-5, atol=1e-8
            )
        # every other logit of the position is pushed up: p_y must fall
        others = [v for v in range(VOCAB) if v != y]
        assert bool((z.grad[b, t, others] < 0).all()), (b, t)
    step = z.grad / z.grad.abs().max()  # SatImp's p^5 weights make tiny gradients
    stepped = torch.softmax((z.detach() - 0.5 * step).double(), -1)
    for b, t, y in scored:
        assert stepped[b, t, y] < probs[b, t, y]
    # positions outside the answer get no gradient
    assert (
        float(z.grad[1, 0].abs().sum()) == 0.0 and float(z.grad[:, 3].abs().sum()) == 0
    )


# ------------------------------------------------------------ refusal losses
def test_idknll_raises_the_refusals():
    model, spec, ctx = _setup("idknll")
    before = _seq_logp(model, IDK)
    forget, _ = spec.step(ctx, _batches())
    assert float(forget.detach()) == pytest.approx(_mean_nll(model, IDK), rel=1e-5)
    _sgd(model, forget)
    after = _seq_logp(model, IDK)
    assert all(a > b for a, b in zip(after, before, strict=True))


def test_idkdpo_prefers_the_refusal_over_the_true_answer():
    model, spec, ctx = _setup("idkdpo")
    beta = ctx.params["beta"]
    idk0, true0 = _seq_logp(model, IDK), _seq_logp(model, FORGET)
    forget, _ = spec.step(ctx, _batches())
    # at the start π = π_ref: margin 0, loss −(2/β)·log σ(0) = (2/β)·log 2
    assert float(forget.detach()) == pytest.approx((2 / beta) * math.log(2), rel=1e-6)
    _sgd(model, forget)
    idk1, true1 = _seq_logp(model, IDK), _seq_logp(model, FORGET)
    margins = [
        (i1 - i0) - (t1 - t0)
        for i0, i1, t0, t1 in zip(idk0, idk1, true0, true1, strict=True)
    ]
    assert all(m > 0 for m in margins)
    assert sum(idk1) > sum(idk0) and sum(true1) < sum(true0)
    # by hand away from the reference: −(2/β)·mean log σ(β·margin)
    want = -(2 / beta) * sum(_log_sigmoid(beta * m) for m in margins) / len(margins)
    assert float(spec.step(ctx, _batches())[0].detach()) == pytest.approx(
        want, rel=1e-5
    )


# ------------------------------------------------------------ retain terms
@pytest.mark.parametrize("name", NLL_RETAIN)
def test_retain_term_is_the_retain_nll_and_raises_the_retain_answers(name):
    model, spec, ctx = _setup(name)
    before = _seq_logp(model, RETAIN)
    _, retain = spec.step(ctx, _batches())
    assert retain is not None
    assert float(retain.detach()) == pytest.approx(_mean_nll(model, RETAIN), rel=1e-5)
    _sgd(model, retain)
    after = _seq_logp(model, RETAIN)
    assert all(a > b for a, b in zip(after, before, strict=True))
    # no retain batch: no retain term
    _, none = spec.step(ctx, StepBatches(**{**vars(_batches()), "retain": None}))
    assert none is None


@pytest.mark.parametrize("name", ["ga", "uce"])
def test_forget_only_losses_have_no_retain_term(name):
    model, spec, ctx = _setup(name)
    assert spec.step(ctx, _batches())[1] is None


# ------------------------------------------------------------ RMU
def test_rmu_steers_forget_activations_to_the_control_vector():
    model, spec, ctx = _setup("rmu")
    u = _control(SEED, ctx.params["steering_coeff"])
    ids = torch.tensor(FORGET)
    with torch.no_grad():
        before = _dist(model.hidden(ids, 1), u)
    forget, retain = spec.step(ctx, _batches())
    assert float(forget.detach()) == pytest.approx(before, rel=1e-5)
    assert float(retain.detach()) == pytest.approx(0.0, abs=1e-12)  # model = reference
    _sgd(model, forget)
    with torch.no_grad():
        after = _dist(model.hidden(ids, 1), u)
    assert after < before
    # the head is past the tapped layer: it got no gradient, so it did not move
    assert torch.equal(model.head.weight, _Toy().head.weight)


def test_rmu_retain_term_pulls_retain_activations_back_to_the_reference():
    model, spec, ctx = _setup("rmu")
    ids = torch.tensor(RETAIN)
    with torch.no_grad():
        ref_h = model.hidden(ids, 1).clone()
    _sgd(model, spec.step(ctx, _batches())[0])  # steer away from the reference
    with torch.no_grad():
        moved = _dist(model.hidden(ids, 1), ref_h)
    assert moved > 0
    _, retain = spec.step(ctx, _batches())
    assert float(retain.detach()) == pytest.approx(moved, rel=1e-5)
    _sgd(model, retain)
    with torch.no_grad():
        back = _dist(model.hidden(ids, 1), ref_h)
    assert back < moved
