"""Prompt-shared teacher-forced scoring equals one full forward pass per pair.

``evaluate(..., share_prompts=True)`` (the default) runs each unique prompt once
and scores its answers as continuations of the prompt's KV cache;
``share_prompts=False`` is the full-forward path.  The whole ``evaluate`` output
must agree within 1e-4.  Run this file as a script for a timing of both paths.
"""

from __future__ import annotations

import copy
import math
import time
import warnings

import pytest
import torch

from fed_unlearn.metrics import EvalSplits, evaluate
from fed_unlearn.metrics import model_api as A
from fed_unlearn.metrics import scoring as S
from fed_unlearn.types import QAItem

TOL = 1e-4


def chat_prompt(question: str) -> str:
    """A chat-like prompt: a shared system turn makes prompts ~80% of the tokens."""
    return (
        "<|system|>You are a helpful assistant. Answer briefly.\n"
        f"<|user|>{question}\n<|assistant|>"
    )


GENERAL = [
    QAItem(
        "What is the capital of France?",
        "Paris.",
        "The city of Paris.",
        ("The city of Rome.", "The city of Berlin."),
    ),
    QAItem("What colour is the sky?", "blue", "", ("green", "")),  # "" = EOS only
    QAItem("Who wrote Hamlet?", "Shakespeare", "", ()),  # no options: skipped
]


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def splits(items) -> EvalSplits:
    from fed_unlearn.data import generate_tofu

    other = generate_tofu(0, 2, people_per_client=1).clients[1]
    # prompts of different lengths end up in one batch (sorted by length)
    assert len({len(chat_prompt(it.question)) for it in items}) > 3
    return EvalSplits(
        forget=items, retain=other[:6], holdout=other[6:], general=GENERAL
    )


def _peaked(model: torch.nn.Module, seed: int) -> None:
    """Give a random model the peaked output distributions of a trained one.

    A randomly initialised head gives near-uniform next-token distributions, on
    which Min-K%++ is ill-conditioned (float32 noise moves it by ~1e-4, whatever
    the path): the evaluator then rightly refuses to share prompts.
    """
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.get_output_embeddings().weight, std=1.0)


@pytest.fixture
def lora_model(tiny_model_dir):
    from fed_unlearn.models import LoraSpec, load_lora_model

    model, _ = load_lora_model(tiny_model_dir, LoraSpec(r=2, alpha=4), cache=False)
    torch.manual_seed(3)
    with torch.no_grad():
        n = 0
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param)  # the adapter matters
                n += 1
        assert n == 2 * 7  # q/k/v/o/gate/up/down in both layers
        _peaked(model, 4)
    return model


@pytest.fixture
def gqa_model(tiny_tokenizer):
    """A plain Llama with grouped-query attention (1 KV head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer
    torch.manual_seed(5)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        _peaked(model, 6)
    return model


@pytest.fixture
def bos_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_bos_token = True  # read by encode_qa: prompts start with BOS
    return tok


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(value, list | tuple):
        out = {f"{prefix}#len": len(value)}
        for k, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    return {prefix: value}


def assert_same_eval(shared: dict, full: dict, tol: float = TOL) -> int:
    """Every agg value and per-item value equal (floats within ``tol``)."""
    a, b = _flatten(shared), _flatten(full)
    assert a.keys() == b.keys()
    n = 0
    for key, x in a.items():
        y = b[key]
        if isinstance(x, float) and isinstance(y, float):
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(
                y, rel=tol, abs=tol
            ), key
            n += 1
        else:
            assert x == y, key
    return n


class _Spy:
    """Counts the pairs scored as prompt-cache continuations / by full passes."""

    def __init__(self, monkeypatch):
        self.shared = self.full = 0
        answer_pass, score_full = S.Scorer._answer_pass, S.Scorer._score_full

        def spy_answer(ctx, model, state, batch, *args):
            self.shared += len(batch)
            return answer_pass(ctx, model, state, batch, *args)

        def spy_full(ctx, todo, enc, indices, *args):
            self.full += len(indices)
            return score_full(ctx, todo, enc, indices, *args)

        monkeypatch.setattr(S.Scorer, "_answer_pass", spy_answer)
        monkeypatch.setattr(S.Scorer, "_score_full", spy_full)


def _evaluate(model, tok, splits, batch_size, share, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback expected
        out, _ = evaluate(
            model,
            tok,
            chat_prompt,
            splits,
            batch_size=batch_size,
            max_new_tokens=4,
            share_prompts=share,
            **kw,
        )
    return out


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("which", ["lora", "gqa_bos"])
def test_shared_equals_full_forward(
    which, batch_size, request, splits, tiny_tokenizer, monkeypatch
):
    if which == "lora":
        model, tok = request.getfixturevalue("lora_model"), tiny_tokenizer
    else:
        model, tok = (
            request.getfixturevalue("gqa_model"),
            request.getfixturevalue("bos_tokenizer"),
        )
        assert S.encode_qa(tok, "x", "y")[0][0] == tok.bos_token_id
    full = _evaluate(model, tok, splits, batch_size, share=False)
    spy = _Spy(monkeypatch)
    shared = _evaluate(model, tok, splits, batch_size, share=True)
    # the 5 pairs of each truth-ratio prompt were continuations of its cache
    assert spy.shared >= 5 * len(splits.forget)
    assert spy.full < spy.shared
    assert assert_same_eval(shared, full) > 100


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_truncated_prompts(lora_model, tiny_tokenizer, splits, monkeypatch):
    """``max_length`` cuts prompts from the left, by how long each answer is."""
    kw = {"max_length": 24, "metrics": ["forget_truth_ratio", "mia_min_k_plus_plus"]}
    full = _evaluate(lora_model, tiny_tokenizer, splits, 3, share=False, **kw)
    spy = _Spy(monkeypatch)
    shared = _evaluate(lora_model, tiny_tokenizer, splits, 3, share=True, **kw)
    assert spy.shared > 0
    assert_same_eval(shared, full)


def test_flat_random_model_is_not_shared(
    tiny_model_dir, tiny_tokenizer, splits, monkeypatch
):
    """A random head's flat distributions: its forget / holdout answers (whose
    Min-K%++, EM and ES are rounding-sensitive) mostly take the full pass, and
    every number agrees with the full pass within the sharing tolerance."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    full = _evaluate(model, tiny_tokenizer, splits, 3, share=False)
    scored = {"full": 0, "all": 0}  # forget / holdout answers (the checked pairs)
    score_full, score_uncached = S.Scorer._score_full, S.Scorer._score_uncached

    def count_full(ctx, todo, enc, indices, *args):
        scored["full"] += sum(ctx._detail[i] for i in indices)
        return score_full(ctx, todo, enc, indices, *args)

    def count_all(ctx, todo, *args):
        out = score_uncached(ctx, todo, *args)
        scored["all"] += sum(ctx._detail)
        return out

    monkeypatch.setattr(S.Scorer, "_score_full", count_full)
    monkeypatch.setattr(S.Scorer, "_score_uncached", count_all)
    shared = _evaluate(model, tiny_tokenizer, splits, 3, share=True)
    assert_same_eval(shared, full)
    assert scored["full"] > 0.5 * scored["all"], scored


def test_mismatch_falls_back(gqa_model, tiny_tokenizer, splits, monkeypatch):
    """A continuation that is not the full pass is detected and not used."""
    answer_pass = S.Scorer._answer_pass

    def wrong_positions(ctx, model, state, *args):
        cache, last, mask, lengths = state
        return answer_pass(ctx, model, (cache, last, mask, lengths + 1), *args)

    monkeypatch.setattr(S.Scorer, "_answer_pass", wrong_positions)
    kw = {"metrics": ["forget_truth_ratio", "mia_min_k_plus_plus"], "num_samples": 0}
    full = _evaluate(gqa_model, tiny_tokenizer, splits, 3, share=False, **kw)
    with pytest.warns(RuntimeWarning, match="full forward pass per pair"):
        shared, _ = evaluate(
            gqa_model, tiny_tokenizer, chat_prompt, splits, batch_size=3, **kw
        )
    assert_same_eval(shared, full)  # (the checked pairs ran in other batches)


def test_missing_cache_argument_warns(gqa_model, tiny_tokenizer, splits, monkeypatch):
    """A forward with no KV-cache argument (a renamed API) is a loud fallback."""
    params = dict(A.forward_params(gqa_model))
    assert A.cache_kwarg(gqa_model) in params  # the installed API is supported
    for name in ("cache", "past_key_values"):
        params.pop(name, None)
    monkeypatch.setattr(A, "forward_params", lambda model: params)
    kw = {"metrics": ["forget_truth_ratio"], "num_samples": 0}
    spy = _Spy(monkeypatch)
    with pytest.warns(RuntimeWarning, match="forward takes no past_key_values"):
        evaluate(gqa_model, tiny_tokenizer, chat_prompt, splits, batch_size=3, **kw)
    assert spy.shared == 0 and spy.full > 0


def _benchmark(n_items: int = 40, batch_size: int = 16, repeats: int = 5) -> None:
    """Wall time of both paths (hidden 128, 4 layers, 40 items); not a test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fed_unlearn.data import generate_people, generate_tofu
    from fed_unlearn.models import build_tiny_tokenizer

    torch.set_num_threads(1)
    texts = [
        f"Question: {it.question}\nAnswer: {it.answer}"
        for p in generate_people(99, 20)
        for it in p.items
    ]
    tok = build_tiny_tokenizer(texts, vocab_size=400)
    clients = generate_tofu(0, 4, people_per_client=1).clients
    items = [it for c in clients.values() for it in c][:n_items]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        _peaked(model, 1)
    splits = EvalSplits(forget=items, retain=items, holdout=items, general=items)
    metrics = [  # the teacher-forced ones (generation is the same in both paths)
        "forget_Q_A_Prob",
        "forget_truth_ratio",
        "retain_Truth_Ratio",
        "gk_Truth_Ratio",
        "mia_min_k",
        "mia_min_k_plus_plus",
        "exact_memorization",
    ]
    enc = [S.encode_qa(tok, chat_prompt(it.question), it.answer) for it in items]
    prompt = sum(S._prompt_len(lab) for _, lab in enc) / len(enc)
    total = sum(len(ids) for ids, _ in enc) / len(enc)
    print(f"{len(items)} items, prompt {prompt:.1f} of {total:.1f} tokens per pair")
    times: dict[bool, list[float]] = {True: [], False: []}
    outs = {}
    for _ in range(repeats):
        for share in (False, True):
            t0 = time.perf_counter()
            outs[share], _ = evaluate(
                model,
                tok,
                chat_prompt,
                splits,
                batch_size=batch_size,
                metrics=metrics,
                num_samples=0,
                share_prompts=share,
            )
            times[share].append(time.perf_counter() - t0)
    n = assert_same_eval(outs[True], outs[False])
    full, shared = min(times[False]), min(times[True])
    print(f"{n} values equal within {TOL}")
    print(f"full forward: {full:.3f}s  shared prompts: {shared:.3f}s  ")
    print(f"speed-up x{full / shared:.2f} (batch_size={batch_size}, best of {repeats})")


if __name__ == "__main__":
    import sys

    _benchmark(batch_size=int(sys.argv[1]) if len(sys.argv) > 1 else 16)
