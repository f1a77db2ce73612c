"""Golden tests of the metric primitives and the registry (hand-computed values)."""

from __future__ import annotations

import itertools
import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fed_unlearn.metrics import primitives as P
from fed_unlearn.metrics.registry import (
    METRIC_REGISTRY,
    get_metric,
    list_metrics,
    metric,
)

IGN = -100


def _logits_from_probs(rows: list[list[float]]) -> torch.Tensor:
    """[1, T, V] logits whose log-softmax is exactly log(rows)."""
    return torch.log(torch.tensor(rows, dtype=torch.float64)).float()[None]


# ----------------------------------------------------------------- avg_loss & co


def test_avg_loss_hand_values_and_eos_included():
    # T = 4, V = 3. Position t predicts token t+1.
    probs = [
        [0.2, 0.3, 0.5],  # predicts token at t=1 (prompt, ignored)
        [0.5, 0.25, 0.25],  # predicts label 1 at t=2
        [0.1, 0.1, 0.8],  # predicts label 2 at t=3 (EOS, included)
        [1 / 3, 1 / 3, 1 / 3],  # last position predicts nothing
    ]
    logits = _logits_from_probs(probs)
    labels = torch.tensor([[IGN, IGN, 1, 2]])
    expected = -(math.log(0.25) + math.log(0.8)) / 2
    assert P.avg_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_avg_loss_counts_unshifted_labels_quirk():
    # Label at position 0 cannot be predicted, but it is counted in the denominator.
    logits = _logits_from_probs([[0.5, 0.5], [0.5, 0.5]])
    labels = torch.tensor([[1, 0]])
    assert P.avg_loss(logits, labels).item() == pytest.approx(math.log(2) / 2)


def test_avg_loss_batched_with_padding_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 7)
    labels = torch.tensor([[IGN, IGN, 3, 4, 5, IGN], [IGN, 1, 2, IGN, IGN, IGN]])
    out = P.avg_loss(logits, labels)
    for b in range(2):
        ce = F.cross_entropy(
            logits[b, :-1], labels[b, 1:], ignore_index=IGN, reduction="sum"
        )
        n = (labels[b] != IGN).sum()
        assert out[b].item() == pytest.approx((ce / n).item(), abs=1e-6)


def test_token_logprobs_excludes_eos():
    probs = [
        [0.2, 0.3, 0.5],
        [0.5, 0.25, 0.25],
        [0.1, 0.1, 0.8],
        [0.6, 0.2, 0.2],
        [1 / 3, 1 / 3, 1 / 3],
    ]
    logits = _logits_from_probs(probs)
    labels = torch.tensor([[IGN, IGN, 1, 2, 0]])  # 0 = EOS (last labelled)
    ((tok, vocab, lab),) = P.token_logprobs(logits, labels)
    assert lab.tolist() == [1, 2]
    assert tok.tolist() == pytest.approx([math.log(0.25), math.log(0.8)], abs=1e-6)
    assert vocab.shape == (2, 3)
    assert vocab.exp().tolist()[0] == pytest.approx(probs[1], abs=1e-6)


def test_token_logprobs_only_eos_gives_empty_and_batches():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[IGN, IGN, IGN, 4], [IGN, 1, 2, 4]])
    out = P.token_logprobs(logits, labels)
    assert out[0][0].numel() == 0 and out[0][1].shape == (0, 5)
    lp = F.log_softmax(logits[1], -1)
    assert out[1][0].tolist() == pytest.approx([lp[0, 1].item(), lp[1, 2].item()])
    assert out[1][2].tolist() == [1, 2]


def test_prob_from_avg_loss_types():
    assert P.prob_from_avg_loss(math.log(4)) == pytest.approx(0.25)
    np.testing.assert_allclose(
        P.prob_from_avg_loss(np.array([0.0, math.log(2)])), [1.0, 0.5]
    )
    t = P.prob_from_avg_loss(torch.tensor([math.log(5)]))
    assert isinstance(t, torch.Tensor) and t.item() == pytest.approx(0.2)


def test_normalised_prob_hand_values():
    correct = [math.log(2), -math.log(0.6)]  # P_c = 0.5, 0.6
    wrong = [[math.log(4), math.log(4)], [-math.log(0.2)]]  # ragged: 0.25+0.25, 0.2
    per_item = P.normalised_prob_per_item(correct, wrong)
    np.testing.assert_allclose(per_item, [0.5, 0.75], rtol=1e-9)
    assert P.normalised_prob(correct, wrong) == pytest.approx(0.625)
    two_d = P.normalised_prob(np.array([math.log(2)]), np.array([[math.log(2)]]))
    assert two_d == pytest.approx(0.5)


# ------------------------------------------------------------------ truth ratio


def test_truth_ratio_geometric_mean_of_wrong():
    # P_c = 0.5; wrong losses log2, log8 -> mean log4 -> P_w = 0.25 -> TR = 0.5
    tr = P.truth_ratio([math.log(2)], [[math.log(2), math.log(8)]])
    np.testing.assert_allclose(tr, [0.5], rtol=1e-9)
    # P_c = 0.25, P_w = 0.5 -> TR = 2
    tr2 = P.truth_ratio(np.array([math.log(4)]), np.array([[math.log(2)]]))
    np.testing.assert_allclose(tr2, [2.0], rtol=1e-9)


def test_truth_ratio_aggregators():
    tr = np.array([0.5, 2.0])
    assert P.tr_closer_to_1(tr) == pytest.approx(0.5)
    assert P.tr_true_better(tr) == pytest.approx(0.25)
    assert P.tr_prob_mean(tr) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert P.tr_closer_to_1([1.0]) == pytest.approx(1.0)
    assert P.tr_true_better([0.0, 3.0]) == pytest.approx(0.5)
    # prob_mean equals P_c / (P_c + P_w) computed directly
    p_c, p_w = 0.3, 0.1
    assert P.tr_prob_mean([p_w / (p_c + 1e-10)]) == pytest.approx(p_c / (p_c + p_w))
    with pytest.raises(ValueError):
        P.tr_true_better([])


def test_truth_ratio_errors():
    with pytest.raises(ValueError):
        P.truth_ratio([1.0, 2.0], [[1.0]])
    with pytest.raises(ValueError):
        P.truth_ratio([1.0], [[]])


# ----------------------------------------------------- forget quality & utility


def test_forget_quality_ks():
    x = np.linspace(0.1, 2.0, 20)
    assert P.forget_quality(x, x.copy()) == pytest.approx(1.0)
    small = P.forget_quality(np.arange(10.0), np.arange(100.0, 110.0))
    assert small < 1e-3
    # exact two-sided p-value of disjoint samples of 10 vs 10: 2 / C(20, 10)
    assert small == pytest.approx(2 / math.comb(20, 10), rel=1e-6)


def test_forget_quality_missing_reference():
    for ref in (None, [], np.array([])):
        with pytest.raises(P.MissingReferenceError):
            P.forget_quality([0.5, 0.6], ref)
    assert issubclass(P.MissingReferenceError, ValueError)


def test_model_utility():
    assert P.model_utility([1.0, 2.0, 4.0]) == pytest.approx(3 / 1.75)
    assert P.model_utility([0.5] * 9) == pytest.approx(0.5)
    assert P.model_utility([0.3, 0.0, 0.9]) == 0.0
    with pytest.raises(ValueError):
        P.model_utility([])
    with pytest.raises(ValueError):
        P.model_utility([0.5, -0.1])


# ------------------------------------------------------------------------ ROUGE


def test_rouge_l():
    gt, gen = "the cat sat on the mat", "the cat"
    assert P.rouge_l_recall(gt, gen) == pytest.approx(2 / 6)
    assert P.rouge_l_f1(gt, gen) == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert P.rouge_l_recall("she runs", "she running") == pytest.approx(1.0)  # stems
    assert P.rouge_l_recall("a b", "") == 0.0
    assert P.rouge_l_recall("the mat the cat", "cat mat") == pytest.approx(1 / 4)


# -------------------------------------------------------------------------- MIA


def test_mia_loss_zlib_reference():
    assert P.mia_loss(1.25) == 1.25
    text = "hello hello hello"
    assert P.mia_zlib(2.0, text) == pytest.approx(
        2.0 / len(zlib.compress(text.encode()))
    )
    assert P.mia_zlib(1.6, "") == pytest.approx(1.6 / 8)  # zlib of b"" is 8 bytes
    assert P.mia_reference(2.0, 0.5) == pytest.approx(1.5)
    np.testing.assert_allclose(P.mia_reference([1.0, 2.0], [0.5, 3.0]), [0.5, -1.0])


def test_mia_min_k():
    lp = [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert P.mia_min_k(lp, k=0.4) == pytest.approx(4.5)  # int(2.0) = 2 lowest
    assert P.mia_min_k(torch.tensor(lp), k=1.0) == pytest.approx(3.0)
    assert P.mia_min_k([-1.0, -3.0], k=0.4) == pytest.approx(3.0)  # k*n < 1 -> 1
    assert P.mia_min_k([], k=0.4) == 0.0
    with pytest.raises(ValueError):
        P.mia_min_k(lp, k=0.0)


def test_mia_min_k_plus_plus_bernoulli():
    # V = 2 with probs (p, 1-p): mu = E[l], var = p(1-p)(log p - log(1-p))^2.
    ps = [0.8, 0.3, 0.6]
    toks = [0, 1, 0]
    vocab = torch.log(torch.tensor([[p, 1 - p] for p in ps], dtype=torch.float64))
    tok_lp = vocab[torch.arange(3), torch.tensor(toks)]
    z = []
    for p, t in zip(ps, toks, strict=True):
        mu = p * math.log(p) + (1 - p) * math.log(1 - p)
        sd = math.sqrt(p * (1 - p)) * abs(math.log(p) - math.log(1 - p))
        z.append((math.log(p if t == 0 else 1 - p) - mu) / sd)
    z_sorted = sorted(z)
    assert P.mia_min_k_plus_plus(tok_lp, vocab, k=0.4) == pytest.approx(-z_sorted[0])
    assert P.mia_min_k_plus_plus(tok_lp, vocab, k=1.0) == pytest.approx(-np.mean(z))
    assert P.mia_min_k_plus_plus(torch.zeros(0), torch.zeros(0, 2)) == 0.0


def test_mia_min_k_plus_plus_variance_clamp():
    # Uniform distribution: var = 0 -> clamped to 1e-6, z = 0.
    vocab = torch.full((2, 4), math.log(0.25), dtype=torch.float64)
    assert P.mia_min_k_plus_plus(vocab[:, 0], vocab) == pytest.approx(0.0, abs=1e-9)
    # a target 1e-3 below the mean is exactly one clamped std (sqrt(1e-6)) below it
    tok = vocab[:, 0] - 1e-3
    assert P.mia_min_k_plus_plus(tok, vocab, k=1.0) == pytest.approx(1.0, rel=1e-6)


def _auc_by_pairs(f, h):
    total = 0.0
    for a, b in itertools.product(f, h):
        total += 1.0 if b > a else 0.5 if b == a else 0.0
    return total / (len(f) * len(h))


def test_roc_auc_hand_cases():
    assert P.roc_auc([0.1, 0.2], [0.8, 0.9]) == 1.0
    assert P.roc_auc([0.8, 0.9], [0.1, 0.2]) == 0.0
    assert P.roc_auc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5
    f, h = [0.1, 0.4, 0.35], [0.8, 0.4, 0.2]
    assert P.roc_auc(f, h) == pytest.approx(6.5 / 9)
    assert _auc_by_pairs(f, h) == pytest.approx(6.5 / 9)


def test_roc_auc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        f = rng.integers(0, 5, size=rng.integers(1, 9)).astype(float)
        h = rng.integers(0, 5, size=rng.integers(1, 9)).astype(float)
        assert P.roc_auc(f, h) == pytest.approx(_auc_by_pairs(f, h))


def test_roc_auc_errors():
    with pytest.raises(ValueError):
        P.roc_auc([], [0.1])
    with pytest.raises(ValueError):
        P.roc_auc([float("nan")], [0.1])


def test_privleak_arithmetic():
    assert P.privleak(0.9) == pytest.approx((0.1 - 0.5) / 0.5 * 100)  # -80
    assert P.privleak(0.5) == pytest.approx(0.0)
    assert P.privleak(0.3, 0.6) == pytest.approx((0.7 - 0.4) / 0.4 * 100)  # 75
    assert P.privleak(0.2, 1.0) == pytest.approx(0.8 / 1e-10 * 100)  # 1e-10 guard


# ----------------------------------------------------------------- memorization


def test_exact_memorization():
    assert P.exact_memorization([1, 2, 3, 4], [1, 2, 0, 4]) == pytest.approx(0.75)
    assert P.exact_memorization(torch.tensor([5]), torch.tensor([5])) == 1.0
    assert P.exact_memorization([], []) is None
    with pytest.raises(ValueError):
        P.exact_memorization([1], [1, 2])


def test_extraction_strength_quirks():
    lab = [1, 2, 3, 4]
    assert P.extraction_strength([1, 2, 3, 4], lab) == 1.0  # k* = 0
    assert P.extraction_strength([9, 9, 3, 4], lab) == pytest.approx(0.5)  # k* = 2
    # nothing matches (last token wrong): loop ends at k = L-1 -> ES = 1/L, not 0
    assert P.extraction_strength([1, 2, 3, 9], lab) == pytest.approx(1 / 4)
    assert P.extraction_strength([9, 9, 9, 9], lab) == pytest.approx(1 / 4)
    assert P.extraction_strength([], []) == 0.0  # L = 0
    assert P.extraction_strength([7], [7]) == 1.0


# ---------------------------------------------------------------------- gradnorm


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 6, dim: int = 4) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.drop = torch.nn.Dropout(0.0)
        self.head = torch.nn.Linear(dim, vocab)
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        class Out:
            pass

        out = Out()
        out.logits = self.head(self.drop(self.emb(input_ids)))
        return out


def test_gradnorm_score_mean_of_tensor_norms():
    torch.manual_seed(0)
    model = _TinyLM()
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5]]),
        "attention_mask": torch.ones(1, 5, dtype=torch.long),
        "labels": torch.tensor([[IGN, IGN, 3, 4, 5]]),  # 5 = EOS, excluded
    }
    # independent: loss = -mean log p(3 | pos 1), log p(4 | pos 2)
    logits = model(batch["input_ids"]).logits[0]
    lp = F.log_softmax(logits, -1)
    loss = -(lp[1, 3] + lp[2, 4]) / 2
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    expected = torch.stack([g.norm(2) for g in grads]).mean().item()

    model.eval()
    score = P.gradnorm_score(model, batch)
    assert score == pytest.approx(expected, rel=1e-5)
    assert not model.training and not model.drop.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # grads zeroed
    model.train()
    P.gradnorm_score(model, batch)
    assert model.training


def test_gradnorm_score_errors_and_empty():
    model = _TinyLM()
    two = {
        "input_ids": torch.ones(2, 3, dtype=torch.long),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
        "labels": torch.ones(2, 3, dtype=torch.long),
    }
    with pytest.raises(ValueError):
        P.gradnorm_score(model, two)
    only_eos = {
        "input_ids": torch.tensor([[1, 2, 5]]),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
        "labels": torch.tensor([[IGN, IGN, 5]]),
    }
    assert P.gradnorm_score(model, only_eos) == 0.0


# ----------------------------------------------------------------------- fluency


def test_fluency_proxy():
    assert P.fluency_proxy("") == 0.0
    assert P.fluency_proxy("   \n") == 0.0
    assert P.fluency_proxy("The cat sat on the mat.") == pytest.approx(1.0)
    assert P.fluency_proxy("the the the the") == pytest.approx(1 / 3)
    assert P.fluency_proxy("### 123 @@") == 0.0
    assert P.fluency_proxy("hello world 42") == pytest.approx(2 / 3)
    assert P.fluency_proxy("Hello") == 1.0
    assert 0.0 <= P.fluency_proxy("zq!! x9 a-b ''") <= 1.0


# ---------------------------------------------------------------------- registry


def test_registry_register_duplicate_and_lookup():
    name = "_test_dummy_metric"
    try:

        @metric(name=name, direction="lower")
        def dummy(ctx):
            """Dummy metric for the test."""
            return {"agg_value": 0.0}

        spec = METRIC_REGISTRY[name]
        assert spec.fn is dummy and spec.direction == "lower"
        assert (
            not spec.needs_reference
            and spec.description == "Dummy metric for the test."
        )
        assert name in list_metrics() and list_metrics() == sorted(list_metrics())
        assert get_metric(name) is spec
        with pytest.raises(ValueError, match="already registered"):

            @metric(name=name, direction="higher")
            def dummy2(ctx):
                """Second."""
    finally:
        METRIC_REGISTRY.pop(name, None)


def test_registry_errors_and_builtin_metrics():
    with pytest.raises(ValueError):
        metric(name="_bad_direction", direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="forget_Q_A_Prob"):
        get_metric("no_such_metric")
    import fed_unlearn.metrics  # noqa: F401  (registers the evaluator metrics)

    spec = get_metric("forget_quality")
    assert spec.needs_reference and spec.direction == "higher"
    assert get_metric("model_utility").splits == ("retain", "general")
