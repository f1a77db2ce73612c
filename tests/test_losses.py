"""Inner unlearning losses: golden values, registry, and the training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fed_unlearn.data.qa import collate
from fed_unlearn.losses import (
    IDK_ANSWERS,
    LOSSES,
    dpo_loss,
    frozen_reference,
    get_loss,
    idk_items,
    list_losses,
    masked_mse,
    mean_nll,
    npo_loss,
    rmu_control_vector,
    satimp_loss,
    sequence_nll,
    simnpo_loss,
    uce_token_loss,
    undial_loss,
    undial_targets,
    unlearn_train,
    wga_loss,
)
from fed_unlearn.models import (
    LoraSpec,
    get_adapter,
    init_adapter,
    load_lora_model,
    prompt_formatter,
    set_adapter,
)
from fed_unlearn.training import TrainSpec, encode_items

# --------------------------------------------------------------------------- helpers
# Hand-written logits: 2 sequences x 3 positions x vocab 4.
LOGITS = [
    [[0.5, -1.0, 2.0, 0.0], [1.0, 0.2, -0.3, 0.8], [0.0, 0.0, 0.0, 0.0]],
    [[-0.4, 1.5, 0.3, 0.1], [2.2, -0.7, 0.9, -1.1], [0.3, 0.6, -0.2, 1.4]],
]
LABELS = [[-100, 2, 1], [-100, 0, 3]]
# After the shift: seq 0 scores token 2 at pos 0 and token 1 at pos 1;
# seq 1 scores token 0 at pos 0 and token 3 at pos 1.


def _logits(requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(LOGITS, dtype=torch.float32, requires_grad=requires_grad)


def _labels() -> torch.Tensor:
    return torch.tensor(LABELS)


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _scored() -> list[tuple[int, int, int]]:
    """(batch, logit position, target) of every scored answer token."""
    out = []
    for b, lab in enumerate(LABELS):
        for t in range(len(lab) - 1):
            if lab[t + 1] != -100:
                out.append((b, t, lab[t + 1]))
    return out


def _tok_nll(b: int, t: int, y: int) -> float:
    return -math.log(_softmax(LOGITS[b][t])[y])


# --------------------------------------------------------------------------- golden
def test_nll_flavours_golden():
    scored = _scored()
    per_seq = [0.0, 0.0]
    for b, t, y in scored:
        per_seq[b] += _tok_nll(b, t, y)
    got = sequence_nll(_logits(), _labels())
    assert got.tolist() == pytest.approx(per_seq, rel=1e-6)
    assert float(mean_nll(_logits(), _labels())) == pytest.approx(
        sum(per_seq) / len(scored), rel=1e-6
    )
    # padding / prompt positions do not count
    lab = _labels().clone()
    lab[1] = -100
    assert float(mean_nll(_logits(), lab)) == pytest.approx(per_seq[0] / 2, rel=1e-6)


def test_npo_golden_and_closed_form():
    logp = [-2.0, -5.0, -1.2]
    ref = [-3.0, -4.0, -1.2]
    beta = 0.1
    expected = np.mean(
        [
            (2 / beta) * math.log(1 + math.exp(beta * (a - r)))
            for a, r in zip(logp, ref, strict=True)
        ]
    )
    # (2/β)·log(1 + (π/π_ref)^β)
    closed = np.mean(
        [
            (2 / beta) * math.log(1 + (math.exp(a) / math.exp(r)) ** beta)
            for a, r in zip(logp, ref, strict=True)
        ]
    )
    got = float(npo_loss(torch.tensor(logp), torch.tensor(ref), beta))
    assert got == pytest.approx(expected, rel=1e-6)
    assert got == pytest.approx(closed, rel=1e-6)
    same = npo_loss(torch.tensor([-4.0]), torch.tensor([-4.0]), 0.5)
    assert float(same) == pytest.approx((2 / 0.5) * math.log(2), rel=1e-6)


def test_simnpo_golden():
    nll, lengths, beta, delta = [3.0, 8.0], [2.0, 4.0], 4.5, 0.5
    terms = []
    for n, ln in zip(nll, lengths, strict=True):
        z = beta * (n / ln - delta)
        terms.append(-(2 / beta) * math.log(1 / (1 + math.exp(-z))))
    got = simnpo_loss(torch.tensor(nll), torch.tensor(lengths), beta, delta)
    assert float(got) == pytest.approx(sum(terms) / 2, rel=1e-6)


def test_idkdpo_golden():
    w, wr, lo, lr_, beta = [-5.0, -7.0], [-6.0, -6.5], [-2.0, -3.0], [-2.5, -2.0], 0.1
    terms = []
    for a, b, c, d in zip(w, wr, lo, lr_, strict=True):
        m = (a - b) - (c - d)
        terms.append(-(2 / beta) * math.log(1 / (1 + math.exp(-beta * m))))
    got = dpo_loss(*(torch.tensor(v) for v in (w, wr, lo, lr_)), beta)
    assert float(got) == pytest.approx(sum(terms) / 2, rel=1e-6)


def test_uce_golden_and_bounded():
    scored = _scored()
    expected = sum(
        -math.log(1 - math.exp(-_tok_nll(b, t, y)) / 2) for b, t, y in scored
    ) / len(scored)
    assert float(uce_token_loss(_logits(), _labels())) == pytest.approx(
        expected, rel=1e-6
    )
    torch.manual_seed(0)
    for scale in (0.1, 5.0, 50.0):
        lg = torch.randn(3, 6, 11) * scale
        lab = torch.randint(0, 11, (3, 6))
        lab[:, :2] = -100
        v = float(uce_token_loss(lg, lab))
        assert 0.0 <= v <= math.log(2) + 1e-6
    # p -> 1 gives log 2, p -> 0 gives 0
    sure = torch.full((1, 2, 3), -30.0)
    sure[0, 0, 1] = 30.0
    lab = torch.tensor([[-100, 1]])
    assert float(uce_token_loss(sure, lab)) == pytest.approx(math.log(2), abs=1e-6)
    assert float(uce_token_loss(sure, torch.tensor([[-100, 2]]))) == pytest.approx(
        0.0, abs=1e-6
    )


@pytest.mark.parametrize("kind", ["wga", "satimp"])
def test_weighted_ascent_golden_with_detached_weights(kind):
    beta, b1, b2 = 1.5, 5.0, 1.0
    scored = _scored()
    n = len(scored)
    expected_value = 0.0
    expected_grad = np.zeros((2, 3, 4))
    for b, t, y in scored:
        probs = _softmax(LOGITS[b][t])
        p = probs[y]
        w = p**beta if kind == "wga" else p**b1 * (1 - p) ** b2
        expected_value += -w * (-math.log(p)) / n
        # weight held constant: d/dz of -(w/n)·CE = -(w/n)·(softmax - onehot)
        for v in range(4):
            expected_grad[b, t, v] = -(w / n) * (probs[v] - (1.0 if v == y else 0.0))
    lg = _logits(requires_grad=True)
    if kind == "wga":
        loss = wga_loss(lg, _labels(), beta)
    else:
        loss = satimp_loss(lg, _labels(), b1, b2)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(expected_value, rel=1e-6)
    np.testing.assert_allclose(lg.grad.numpy(), expected_grad, rtol=1e-5, atol=1e-7)


def test_undial_targets_and_loss_golden():
    beta = 3.0
    ref = [
        [[0.1, 0.4, -0.2, 0.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]],
        [[1.0, -1.0, 0.2, 0.3], [0.0, 0.7, -0.4, 0.9], [0.1, 0.2, 0.3, 0.4]],
    ]
    q = undial_targets(torch.tensor(ref), _labels(), beta)
    total = 0.0
    for b, t, y in _scored():
        z = [ref[b][t][v] - (beta if v == y else 0.0) for v in range(4)]
        q_exp = _softmax(z)
        assert q[b, t].tolist() == pytest.approx(q_exp, rel=1e-6)
        assert q_exp[y] < _softmax(ref[b][t])[y]  # the true token loses mass
        p = _softmax(LOGITS[b][t])
        total += -sum(q_exp[v] * math.log(p[v]) for v in range(4))
    got = undial_loss(_logits(), torch.tensor(ref), _labels(), beta)
    assert float(got) == pytest.approx(total / len(_scored()), rel=1e-6)


def test_rmu_masked_mse_golden_and_control_vector():
    x = [[[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]], [[0.5, 0.5], [2.0, 1.0], [9.0, 9.0]]]
    y = [[[0.0, 1.0], [5.0, 5.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, 3.0], [0.0, 0.0]]]
    mask = [[1, 0, 1], [0, 1, 0]]
    per_seq = []
    for b in range(2):
        s, cnt = 0.0, 0
        for t in range(3):
            if mask[b][t]:
                s += sum((x[b][t][d] - y[b][t][d]) ** 2 for d in range(2)) / 2
                cnt += 1
        per_seq.append(s / cnt)
    got = masked_mse(torch.tensor(x), torch.tensor(y), torch.tensor(mask).bool())
    assert float(got) == pytest.approx(sum(per_seq) / 2, rel=1e-6)
    # broadcasting a control vector
    u = torch.tensor([1.0, -2.0])
    exp_u = np.mean(
        [
            np.mean(
                [
                    ((x[b][t][0] - 1.0) ** 2 + (x[b][t][1] + 2.0) ** 2) / 2
                    for t in range(3)
                    if mask[b][t]
                ]
            )
            for b in range(2)
        ]
    )
    assert float(masked_mse(torch.tensor(x), u, torch.tensor(mask))) == pytest.approx(
        exp_u, rel=1e-6
    )
    a, b = rmu_control_vector(16, 2.0, 7), rmu_control_vector(16, 2.0, 7)
    assert torch.equal(a, b) and float(a.norm()) == pytest.approx(2.0, rel=1e-6)
    assert bool((a >= 0).all())
    assert not torch.equal(a, rmu_control_vector(16, 2.0, 8))


# --------------------------------------------------------------------------- registry
def test_registry_keys_flags_and_lookup_errors():
    assert set(LOSSES) == {
        "ga", "gd", "npo", "simnpo", "idkdpo", "idknll",
        "undial", "wga", "satimp", "rmu", "uce",
    }  # fmt: skip
    no_retain = {n for n, s in LOSSES.items() if not s.uses_retain}
    assert no_retain == {"ga", "uce"}
    refs = {n for n, s in LOSSES.items() if s.needs_reference}
    assert refs == {"npo", "idkdpo", "undial", "rmu"}
    assert get_loss("simnpo").defaults == {
        "gamma": 0.125, "alpha": 1.0, "beta": 4.5, "delta": 0.0
    }  # fmt: skip
    assert get_loss("undial").defaults["beta"] == 10.0
    assert get_loss("satimp").defaults == {
        "gamma": 1.0, "alpha": 1.0, "beta1": 5.0, "beta2": 1.0
    }  # fmt: skip
    names = [n for n, _ in list_losses()]
    assert names == sorted(LOSSES)
    assert all("[" in s and "]" in s for _, s in list_losses())
    with pytest.raises(KeyError, match="unknown inner loss 'nope'; known: ga, gd"):
        get_loss("nope")
    with pytest.raises(ValueError, match="'gamma_x'.*valid: alpha, beta, gamma"):
        get_loss("npo").resolve({"gamma_x": 1.0})
    with pytest.raises(ValueError, match="'alpha'"):
        get_loss("ga").resolve({"alpha": 1.0})
    assert get_loss("npo").resolve({"beta": 0.5})["beta"] == 0.5


def test_idk_answers():
    assert len(IDK_ANSWERS) >= 15 and len(set(IDK_ANSWERS)) == len(IDK_ANSWERS)
    from fed_unlearn.types import QAItem

    its = [QAItem(f"q{i}?", f"a{i}") for i in range(8)]
    a, b = idk_items(its, 3), idk_items(its, 3)
    assert a == b and all(x.answer in IDK_ANSWERS for x in a)
    assert [x.question for x in a] == [x.question for x in its]


# --------------------------------------------------------------------------- training
@pytest.fixture
def lora(tiny_model_dir):
    model, tok = load_lora_model(tiny_model_dir, LoraSpec(r=4, alpha=8), cache=False)
    set_adapter(model, init_adapter(model, 0))
    return model, tok, prompt_formatter(tok)


@pytest.fixture
def retain_items():
    from fed_unlearn.data import generate_tofu

    return generate_tofu(0, 2, people_per_client=1).clients[1]


def _batch(tok, pf, items):
    return collate(encode_items(tok, pf, items, 64), int(tok.pad_token_id))


def _mean_answer_logprob(model, tok, pf, items) -> float:
    batch = _batch(tok, pf, items)
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    model.train(was)
    return float(-mean_nll(logits, batch["labels"]))


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


SPEC = TrainSpec(epochs=1, batch_size=4, lr=1e-2, max_length=64)


@pytest.mark.parametrize("loss", ["ga", "npo"])
def test_unlearning_lowers_forget_logprob(lora, items, loss):
    model, tok, pf = lora
    before = _mean_answer_logprob(model, tok, pf, items)
    spec = TrainSpec(epochs=3, batch_size=4, lr=5e-2, max_length=64)
    stats = unlearn_train(model, tok, pf, items, loss, spec, seed=0)
    after = _mean_answer_logprob(model, tok, pf, items)
    assert after < before - 0.1
    assert stats.steps == 3 * -(-len(items) // 4) and stats.tokens > 0
    assert math.isfinite(stats.loss) and not model.training
    capped = TrainSpec(epochs=3, batch_size=4, lr=5e-2, max_length=64, max_steps=2)
    assert unlearn_train(model, tok, pf, items, loss, capped, seed=0).steps == 2


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_runs_and_cleans_up(lora, items, retain_items, loss):
    model, tok, pf = lora
    start = get_adapter(model)
    seen: list[tuple[int, float]] = []
    stats = unlearn_train(
        model, tok, pf, items[:4], loss, SPEC, seed=1,
        retain_items=retain_items[:4], on_step=lambda s, v: seen.append((s, v)),
    )  # fmt: skip
    assert stats.steps == 1 and len(seen) == 1 and math.isfinite(seen[0][1])
    assert not model.training
    assert not _same(start, get_adapter(model))
    # tokens: forget (+ retain when used, + refusals for the idk losses)
    n_forget = int(_batch(tok, pf, items[:4])["attention_mask"].sum())
    if LOSSES[loss].uses_retain:
        assert stats.tokens > n_forget
    from fed_unlearn.losses import decoder_layers

    assert all(len(layer._forward_hooks) == 0 for layer in decoder_layers(model))


def test_deterministic_for_a_seed(lora, items, retain_items):
    model, tok, pf = lora
    start = get_adapter(model)
    outs = []
    for loss, seed in (("idkdpo", 3), ("idkdpo", 3), ("idkdpo", 4), ("rmu", 3)):
        set_adapter(model, start)
        unlearn_train(
            model, tok, pf, items, loss, SPEC, seed, retain_items=retain_items
        )
        outs.append(get_adapter(model))
    assert _same(outs[0], outs[1])
    assert not _same(outs[0], outs[2])
    set_adapter(model, start)
    unlearn_train(model, tok, pf, items, "rmu", SPEC, 3, retain_items=retain_items)
    assert _same(outs[3], get_adapter(model))


def test_frozen_tensors_stay_unchanged(lora, items, retain_items):
    model, tok, pf = lora
    frozen = [(n, p) for n, p in model.named_parameters() if "lora_A" in n]
    for _, p in frozen:
        p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in frozen}
    b_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n
    }
    try:
        unlearn_train(model, tok, pf, items, "gd", SPEC, 0, retain_items=retain_items)
    finally:
        for _, p in frozen:
            p.requires_grad_(True)
    assert all(torch.equal(p, before[n]) for n, p in frozen)
    assert any(
        not torch.equal(p, b_before[n])
        for n, p in model.named_parameters()
        if "lora_B" in n
    )


def test_rmu_only_moves_layers_up_to_the_tapped_one(lora, items):
    model, tok, pf = lora
    before = get_adapter(model)
    unlearn_train(model, tok, pf, items, "rmu", SPEC, 0, params={"layer": 0})
    after = get_adapter(model)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(".layers.0." in k for k in moved)


def test_reference_is_the_start_adapter(lora, items):
    model, tok, pf = lora
    # a non-trivial start adapter (B != 0)
    unlearn_train(model, tok, pf, items, "ga", SPEC, 9)
    model.eval()
    start = get_adapter(model)
    batch = _batch(tok, pf, items)
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
    }
    with torch.no_grad():
        start_logits = model(**inputs).logits
    ref = frozen_reference(model)
    losses: list[float] = []
    spec = TrainSpec(epochs=3, batch_size=4, lr=5e-2, max_length=64)
    unlearn_train(
        model, tok, pf, items, "npo", spec, 0, on_step=lambda s, v: losses.append(v)
    )
    # step 1: π = π_ref, so the NPO loss is (2/β)·log 2
    assert losses[0] == pytest.approx((2 / 0.1) * math.log(2), rel=1e-5)
    assert losses[-1] < losses[0] - 0.1  # the reference did not follow the model
    trained = get_adapter(model)
    assert not _same(start, trained)
    model.train()
    ref_logits = ref(**inputs).logits
    assert model.training and ref_logits.grad_fn is None
    torch.testing.assert_close(ref_logits, start_logits)
    assert _same(trained, get_adapter(model))  # current weights swapped back


def test_unlearn_train_errors(lora, items):
    model, tok, pf = lora
    with pytest.raises(ValueError, match="no forget items"):
        unlearn_train(model, tok, pf, [], "ga", SPEC, 0)
    with pytest.raises(KeyError, match="known"):
        unlearn_train(model, tok, pf, items, "sgd", SPEC, 0)
    with pytest.raises(ValueError, match="'beta'"):
        unlearn_train(model, tok, pf, items, "ga", SPEC, 0, params={"beta": 1.0})
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with pytest.raises(ValueError, match="no trainable"):
            unlearn_train(model, tok, pf, items, "ga", SPEC, 0)
    finally:
        for p in params:
            p.requires_grad_(True)


def test_reference_fallback_path_matches_fast_path(lora, items, monkeypatch):
    import fed_unlearn.losses.reference as R

    model, tok, pf = lora
    unlearn_train(model, tok, pf, items, "ga", SPEC, 2)  # B != 0
    fast = frozen_reference(model)
    monkeypatch.setattr(R, "_adapter_parameters", lambda *_: None)
    slow = frozen_reference(model)
    assert fast._pairs is not None and slow._pairs is None
    unlearn_train(model, tok, pf, items, "ga", SPEC, 3)
    current = get_adapter(model)
    batch = _batch(tok, pf, items)
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
    }
    torch.testing.assert_close(fast(**inputs).logits, slow(**inputs).logits)
    assert _same(current, get_adapter(model))
