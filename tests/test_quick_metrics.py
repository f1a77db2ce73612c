"""Per-round metric, T2F and split sub-sampling."""

from __future__ import annotations

import math

import pytest
import torch

from fed_unlearn.metrics import answer_prob, spread_items, time_to_forget
from fed_unlearn.models import LoraSpec, load_lora_model, prompt_formatter


@pytest.mark.parametrize(
    ("curve", "oracle", "delta", "patience", "expected"),
    [
        ([0.9, 0.5, 0.12, 0.11, 0.1], 0.1, 0.02, 3, 3),
        ([0.9, 0.1, 0.5, 0.1, 0.1, 0.1], 0.1, 0.02, 3, 4),  # a dip that does not stay
        ([0.9, 0.8, 0.1], 0.1, 0.0, 3, 3),  # short tail: all remaining rounds count
        ([0.9, 0.8, 0.7], 0.1, 0.05, 3, None),
        ([], 0.1, 0.05, 3, None),
    ],
)
def test_time_to_forget(curve, oracle, delta, patience, expected):
    assert time_to_forget(curve, oracle, delta, patience) == expected


def test_time_to_forget_rejects_bad_arguments():
    with pytest.raises(ValueError):
        time_to_forget([0.1], 0.1, -1.0)


def test_spread_items_is_even_and_ordered():
    assert spread_items(list(range(60)), 30) == list(range(0, 60, 2))
    assert spread_items(list(range(5)), 10) == [0, 1, 2, 3, 4]
    assert spread_items(list(range(5)), 0) == [0, 1, 2, 3, 4]
    assert spread_items(list(range(10)), 3) == [0, 3, 6]


def test_answer_prob_matches_a_plain_forward_pass(tiny_model_dir, items):
    model, tok = load_lora_model(tiny_model_dir, LoraSpec(r=2, alpha=4), cache=False)
    pf = prompt_formatter(tok)
    got = answer_prob(model, tok, pf, items[:5], max_length=64, batch_size=2)
    # independent: one item at a time, sum of answer-token log-probs incl. EOS
    probs = []
    for it in items[:5]:
        p_ids = tok(pf(it.question), add_special_tokens=False)["input_ids"]
        a_ids = tok(it.answer, add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id
        ]
        ids = torch.tensor([p_ids + a_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        total = sum(float(logp[len(p_ids) + j - 1, t]) for j, t in enumerate(a_ids))
        probs.append(math.exp(total / len(a_ids)))
    assert got == pytest.approx(sum(probs) / len(probs), rel=1e-5)
    with pytest.raises(ValueError):
        answer_prob(model, tok, pf, [], 64)
