"""TOFU-style evaluation of a causal LM (open-unlearning key names and formats).

:func:`evaluate` scores any Hugging Face causal LM (plain or PEFT-wrapped) on four
splits of :class:`~fed_unlearn.types.QAItem`:

* ``forget``  -- the departed client's data (what should be forgotten);
* ``retain``  -- the remaining clients' held-in data;
* ``holdout`` -- same-distribution data never trained on (MIA non-members);
* ``general`` -- general-knowledge probes with perturbed (wrong) options.

TOFU's model utility averages 9 numbers: retain, real-authors and world-facts x
{Prob, ROUGE, Truth Ratio}.  We have a single general-knowledge split, so its
triple (``gk_Q_A_Prob``, ``gk_Q_A_ROUGE``, ``gk_Truth_Ratio``) is used for BOTH the
real-authors and the world-facts slots (it weighs twice in the harmonic mean).
On the probes the correct option compared with the perturbed ones (normalised
Prob, truth ratio) is the paraphrase when an item has one, else the answer: our
generator shapes the perturbed answers like the paraphrase (TOFU's RA/WF options
are shaped like the answer, which is why open-unlearning uses the answer there).
Items without paraphrase/perturbed answers are skipped for the truth ratio (and
for the normalised Prob); a ValueError is raised if no item remains.

Every metric is a function registered in
:data:`~fed_unlearn.metrics.registry.METRIC_REGISTRY`, taking the evaluation
context.  Teacher-forced scores are computed once per (prompt, answer) pair under
``torch.no_grad()`` in eval mode and shared by all metrics: each unique prompt runs
once (batched, left padding) and its answers are scored as continuations of its KV
cache (batched, right padding), which equals one full forward pass per pair (the
old path, kept as ``evaluate(..., share_prompts=False)`` and as the fallback);
greedy generations (left padding) are cached as well.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fed_unlearn.data.qa import IGNORE_INDEX, PromptFn, collate, encode_qa
from fed_unlearn.metrics import primitives as P
from fed_unlearn.metrics.registry import METRIC_REGISTRY, get_metric, metric
from fed_unlearn.types import QAItem

SPLIT_NAMES = ("forget", "retain", "holdout", "general")

#: ``k`` used by Min-K% / Min-K%++ (TOFU / MUSE configs).
MIA_K = P.MIN_K_DEFAULT
#: Default greedy-generation batch: a decoding step on CPU costs about the same
#: for 16 and 64 rows (weight reads dominate), so generation batches are wider
#: than scoring ones (SmolLM2, 2 cores: 78 s -> 38 s for 300 generations).
GEN_BATCH_SIZE = 64


@contextlib.contextmanager
def merged_lora(model: Any) -> Any:
    """Fold an active LoRA adapter into the base weights for the block; restore exactly.

    Evaluation is gradient-free, so the adapted weight ``W + s BA`` can be
    materialised once instead of running the two low-rank products in every
    forward (on SmolLM2 about 13% of evaluation time). The base weights are
    copied before merging and copied back afterwards, so the model leaves the block
    bit-identical (peft's own unmerge would leave float rounding in ``W``).
    Models without peft LoRA layers, with adapters disabled or already merged are
    left untouched.

    Parameters
    ----------
    model : torch.nn.Module
        A peft model (anything else is a no-op).
    """
    layers = [
        m
        for m in model.modules()
        if hasattr(m, "lora_A") and hasattr(m, "get_base_layer") and hasattr(m, "merge")
    ]
    usable = (
        layers
        and hasattr(model, "merge_adapter")
        and hasattr(model, "unmerge_adapter")
        and not any(getattr(m, "merged", False) for m in layers)
        and not any(getattr(m, "disable_adapters", False) for m in layers)
    )
    if not usable:
        yield
        return
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for m, w in zip(layers, saved, strict=True):
                m.get_base_layer().weight.copy_(w)


@dataclass
class EvalSplits:
    """The four evaluation splits.

    Parameters
    ----------
    forget : list[QAItem]
        Data to be forgotten (the departed client's).
    retain : list[QAItem]
        Held-in data of the remaining clients.
    holdout : list[QAItem]
        Never-trained data of the forget distribution (MIA non-members).
    general : list[QAItem]
        General-knowledge probes; ``perturbed_answers`` are the wrong options.
    """

    forget: list[QAItem] = field(default_factory=list)
    retain: list[QAItem] = field(default_factory=list)
    holdout: list[QAItem] = field(default_factory=list)
    general: list[QAItem] = field(default_factory=list)


@dataclass(frozen=True)
class _SeqStats:
    """Teacher-forced statistics of one (prompt, answer) pair."""

    avg_loss: float
    min_k: float
    min_k_pp: float  # nan outside the forget / holdout answers (see _detail)
    em: float | None  # None there too
    es: float | None
    text: str


class _Context:
    """Evaluation state shared by the metric functions (caches, model, data)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompt_fn: PromptFn,
        splits: EvalSplits,
        reference: dict | None,
        reference_model: Any,
        batch_size: int,
        max_new_tokens: int,
        max_length: int,
        share_prompts: bool = True,
        gen_batch_size: int | None = None,
    ) -> None:
        self.model = model
        self.gen_batch_size = gen_batch_size or max(batch_size, GEN_BATCH_SIZE)
        self.tokenizer = tokenizer
        self.prompt_fn = prompt_fn
        self.splits = splits
        self.reference = reference
        self.reference_model = reference_model
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length
        self.eos_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token")
        self._prompts: dict[str, str] = {}
        self._scores: dict[tuple[str, str, str], _SeqStats] = {}
        self._gens: dict[tuple[str, int], str] = {}
        self._results: dict[str, dict] = {}
        self.share_prompts = share_prompts
        # which model -> whether prompt sharing was verified (True) or refused (False)
        self._share_ok: dict[str, bool] = {}
        self._share_counts: dict[str, list[int]] = {}
        # Pairs whose per-position statistics (Min-K%++, EM, ES) some metric reads:
        # the forget / holdout answers. Other pairs (truth-ratio options, retain
        # and probe answers) need only their loss and token log-probs, so neither
        # the vocabulary moments nor the rounding guard run for them.
        self._detail_pairs = set(self.answer_pairs("forget")) | set(
            self.answer_pairs("holdout")
        )
        self._detail: list[bool] = []  # per pair of the current _score_uncached

    # ------------------------------------------------------------------ data access
    def items(self, split: str) -> list[QAItem]:
        return list(getattr(self.splits, split))

    def prompt(self, question: str) -> str:
        if question not in self._prompts:
            self._prompts[question] = self.prompt_fn(question)
        return self._prompts[question]

    def answer_pairs(self, split: str) -> list[tuple[str, str]]:
        return [(self.prompt(it.question), it.answer) for it in self.items(split)]

    def tr_indices(self, split: str, correct: str) -> list[int]:
        """Return the indices of items usable for the truth ratio.

        ``correct="para"`` needs a paraphrased answer and >= 1 perturbed answer;
        ``correct="para_or_answer"`` (general probes) only needs perturbed answers.
        """
        return [
            i
            for i, it in enumerate(self.items(split))
            if it.perturbed_answers
            and (correct == "para_or_answer" or it.paraphrased_answer)
        ]

    @staticmethod
    def correct_text(item: QAItem, correct: str) -> str:
        """Return the correct answer compared with the perturbed ones.

        ``"para"``: the paraphrase (TOFU forget / retain truth ratio).
        ``"para_or_answer"``: the paraphrase when the item has one, else the answer
        (general probes: our generator gives them perturbed answers shaped like
        the paraphrase, so the paraphrase is the like-for-like correct option;
        TOFU's real-authors / world-facts sets use the answer, whose shape their
        options share).
        """
        if correct == "para" or (
            correct == "para_or_answer" and item.paraphrased_answer
        ):
            return item.paraphrased_answer
        return item.answer

    def tr_pairs(self, split: str, correct: str) -> list[tuple[str, str]]:
        pairs = []
        for i in self.tr_indices(split, correct):
            it = self.items(split)[i]
            p = self.prompt(it.question)
            pairs.append((p, self.correct_text(it, correct)))
            pairs.extend((p, a) for a in it.perturbed_answers)
        return pairs

    # -------------------------------------------------------------------- scoring
    def _model(self, which: str) -> Any:
        return self.model if which == "target" else self.reference_model

    def score(
        self, pairs: Sequence[tuple[str, str]], which: str = "target"
    ) -> list[_SeqStats]:
        """Teacher-forced statistics of (prompt, answer) pairs (cached, batched)."""
        todo = list(dict.fromkeys(p for p in pairs if (which, *p) not in self._scores))
        if todo:
            self._score_uncached(todo, which)
        return [self._scores[(which, *p)] for p in pairs]

    def _score_uncached(self, todo: list[tuple[str, str]], which: str) -> None:
        enc = [encode_qa(self.tokenizer, p, a, self.max_length) for p, a in todo]
        self._detail = [pair in self._detail_pairs for pair in todo]
        rest = list(range(len(todo)))
        if self.share_prompts and self._share_ok.get(which) is not False:
            rest = self._score_shared(todo, enc, which)  # what it left over
        if rest:
            self._score_full(todo, enc, rest, which, self._scores)

    def _batch_stats(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        answers: list[list[int]],
        guard: float | None = None,
        detail: Sequence[bool] | None = None,
    ) -> tuple[list[_SeqStats], list[bool]]:
        """Statistics of a batch (``[B, T, V]`` logits, ``[B, T]`` labels).

        With ``guard`` (a tolerance) also flags, per row, statistics that float32
        rounding noise alone could move by more than it (see :func:`_fragile`):
        such rows are rescored by the full forward pass.
        """
        avg, per_tok = P.answer_statistics(logits, labels)
        losses = avg.tolist()
        want = [True] * len(answers) if detail is None else list(detail)
        sel = [j for j in range(len(answers)) if want[j]]
        # Min-K%++ moments of the detailed rows' positions at once (float64)
        if sel:
            tok_sel = torch.cat([per_tok[j][0] for j in sel])
            vocab_sel = torch.cat([per_tok[j][1] for j in sel])
            mu_all, var_all = P.vocab_moments(vocab_sel)
        offsets, start = {}, 0
        for j in sel:
            offsets[j] = start
            start += per_tok[j][0].numel()
        stats = []
        for j, answer_ids in enumerate(answers):
            tok_lp, vocab_lp, lab = per_tok[j]
            min_k_pp, em, es = math.nan, None, None
            if want[j]:
                n, o = tok_lp.numel(), offsets[j]
                mu, var = mu_all[o : o + n], var_all[o : o + n]
                pred = vocab_lp.argmax(-1)
                min_k_pp = P.min_k_plus_plus_from_moments(tok_lp, mu, var, MIA_K)
                em = P.exact_memorization(pred, lab)
                es = P.extraction_strength(pred, lab)
            stats.append(
                _SeqStats(
                    avg_loss=float(losses[j]),
                    min_k=P.mia_min_k(tok_lp, MIA_K),
                    min_k_pp=min_k_pp,
                    em=em,
                    es=es,
                    text=self.tokenizer.decode(answer_ids, skip_special_tokens=True),
                )
            )
        fragile = [False] * len(stats)
        if guard is None or not sel:
            return stats, fragile
        flags = _fragile(tok_sel, vocab_sel, guard, (mu_all, var_all)).tolist()
        for j in sel:
            n, o = per_tok[j][0].numel(), offsets[j]
            fragile[j] = any(flags[o : o + n])
        return stats, fragile

    def _score_full(
        self,
        todo: list[tuple[str, str]],
        enc: list[tuple[list[int], list[int]]],
        indices: Sequence[int],
        which: str,
        store: dict[tuple[str, str, str], _SeqStats],
    ) -> None:
        """Score ``todo[i]`` (``i`` in ``indices``): one full forward pass per pair.

        Batched, sorted by length, right padding.
        """
        model = self._model(which)
        device = _device(model)
        order = sorted(indices, key=lambda i: len(enc[i][0]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = collate([enc[i] for i in idx], self.pad_id, "right")
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits
            answers = [[t for t in enc[i][1] if t != IGNORE_INDEX] for i in idx]
            stats, _ = self._batch_stats(
                logits,
                batch["labels"].to(device),
                answers,
                detail=[self._detail[i] for i in idx],
            )
            for i, st in zip(idx, stats, strict=True):
                store[(which, *todo[i])] = st
            del logits

    def _score_shared(
        self,
        todo: list[tuple[str, str]],
        enc: list[tuple[list[int], list[int]]],
        which: str,
    ) -> list[int]:
        """Score pairs sharing the prompt computation; return the indices left over.

        Pairs are grouped by their encoded (possibly truncated) prompt ids.  Each
        unique prompt runs once (batched, left padding, explicit position ids) with
        ``use_cache=True``; the answers of a chunk of prompts then run as
        continuations of the prompts' KV cache (rows selected per answer, right
        padding, attention mask ``[prompt mask | answer mask]``, positions
        continuing the prompt's).  The logits that predict an answer's first token
        are the prompt's last logits.

        Left over (for :meth:`_score_full`): pairs whose prompt has no other
        answer (nothing to share) or no token left, and pairs with a statistic
        that rounding alone could move by more than a fifth of the tolerance
        (:func:`_fragile`: a near-tie argmax, Min-K%++ on a flat distribution).

        Until a non-fragile pair of a model has been checked, up to
        ``_CHECK_PAIRS`` pairs of distinct prompts of each batch are also scored
        by the full pass (whose statistics are kept) and compared: on a mismatch
        or an error sharing is switched off for that model with a
        ``RuntimeWarning``.  It is switched off silently once most (of >= 8)
        shared pairs were fragile, e.g. with the flat output distributions of a
        randomly initialised model, where it would not pay.
        """
        model = self._model(which)
        tol, why = _share_tol(model)

        def left_over() -> list[int]:
            return [i for i, p in enumerate(todo) if (which, *p) not in self._scores]

        if tol is None:
            if why:  # an API gap, not a design choice: say so
                self._refuse_sharing(which, why)
            self._share_ok[which] = False
            return left_over()
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (ids, labels) in enumerate(enc):
            n_p = _prompt_len(labels)
            groups.setdefault(tuple(ids[:n_p]), []).append((i, ids[n_p:]))
        for p in list(groups):
            if not p or len(groups[p]) < 2 or any(not a for _, a in groups[p]):
                del groups[p]  # nothing to share: full pass
        device = _device(model)
        prompts = sorted(groups, key=len)
        bs = self.batch_size
        counts = self._share_counts.setdefault(which, [0, 0])  # [shared, fragile]
        for start in range(0, len(prompts), bs):
            chunk = prompts[start : start + bs]
            entries = [(r, i, a) for r, p in enumerate(chunk) for i, a in groups[p]]
            entries.sort(key=lambda e: len(e[2]))
            rows = _answer_rows(bs, len(chunk[-1]), len(entries[-1][2]) - 1)
            state = None
            for a_start in range(0, len(entries), rows):
                batch = entries[a_start : a_start + rows]
                verified = bool(self._share_ok.get(which))
                try:
                    if state is None:
                        state = self._prompt_pass(model, chunk, device)
                    stats, fragile = self._answer_pass(
                        model, state, batch, device, tol / 5
                    )
                except Exception as exc:
                    if verified:
                        raise
                    # e.g. a model whose cache API differs: fall back
                    self._refuse_sharing(which, f"{type(exc).__name__}: {exc}")
                    return left_over()
                # the guard only runs on the detailed pairs: count those
                counts[0] += sum(self._detail[i] for _, i, _ in batch)
                counts[1] += sum(fragile)
                keep = [not bad for bad in fragile]  # fragile: full pass
                if not verified:
                    check = _check_subset(batch, fragile, min(bs, _CHECK_PAIRS))
                    reason = self._verify_shared(
                        todo,
                        enc,
                        [batch[k] for k in check],
                        [stats[k] for k in check],
                        which,
                        tol,
                    )
                    if reason:
                        self._refuse_sharing(which, reason)
                        return left_over()
                    if check:
                        self._share_ok[which] = True
                    for k in check:  # _verify_shared kept their full-pass stats
                        keep[k] = False
                for (_, i, _), st, k in zip(batch, stats, keep, strict=True):
                    if k:
                        self._scores[(which, *todo[i])] = st
                if counts[0] >= 8 and 2 * counts[1] > counts[0]:
                    self._share_ok[which] = False  # mostly fragile: does not pay
                    return left_over()
            del state
        return left_over()

    def _refuse_sharing(self, which: str, reason: str) -> None:
        self._share_ok[which] = False
        warnings.warn(
            f"prompt-shared scoring is not usable for the {which} model ({reason}); "
            "using one full forward pass per pair",
            RuntimeWarning,
            stacklevel=2,
        )

    def _prompt_pass(
        self, model: Any, chunk: list[tuple[int, ...]], device: torch.device
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run unique prompts once (left padding); return their KV cache and more.

        Returns ``(cache, last_logits [P, V], prompt_mask [P, Lp], prompt_len
        [P])``.
        """
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        # real tokens get positions 0..n-1, as in an unpadded sequence
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {}
        if _accepts(model, "logits_to_keep"):
            kwargs["logits_to_keep"] = 1
        if _accepts(model, "cache_position"):  # transformers 4.x
            kwargs["cache_position"] = torch.arange(width, device=device)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **kwargs,
        )
        cache = _output_cache(out)
        if not _cache_supported(cache, width + self.max_length):
            raise TypeError(
                f"its {type(cache).__name__} is not a growable full-attention cache "
                f"(or a sliding window of >= {width + self.max_length} tokens)"
            )
        pad = (mask == 0)[:, None, :, None]
        for layer in cache.layers:  # padding is masked; keep it finite (0 * nan)
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys.masked_fill_(pad, 0.0)
                layer.values.masked_fill_(pad, 0.0)
        last = out.logits[:, -1]
        lengths = torch.tensor([len(p) for p in chunk], dtype=torch.long, device=device)
        return cache, last, mask, lengths

    def _answer_pass(
        self,
        model: Any,
        state: tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor],
        batch: list[tuple[int, int, list[int]]],
        device: torch.device,
        guard: float,
    ) -> tuple[list[_SeqStats], list[bool]]:
        """Score answers as continuations of their prompts' cached states."""
        cache, last, p_mask, p_len = state
        rows = torch.tensor([r for r, _, _ in batch], dtype=torch.long, device=device)
        answers = [a for _, _, a in batch]
        n = len(batch)
        # the last answer token is not fed: its logits predict nothing
        width = max(len(a) for a in answers) - 1
        labels = torch.full((n, width + 2), IGNORE_INDEX, dtype=torch.long)
        for j, a in enumerate(answers):
            labels[j, 1 : 1 + len(a)] = torch.tensor(a, dtype=torch.long)
        first = last.index_select(0, rows)[:, None]
        pieces = [first]
        if width > 0:
            ids = torch.full((n, width), self.pad_id, dtype=torch.long)
            a_mask = torch.zeros((n, width), dtype=torch.long)
            for j, a in enumerate(answers):
                ids[j, : len(a) - 1] = torch.tensor(a[:-1], dtype=torch.long)
                a_mask[j, : len(a) - 1] = 1
            ids, a_mask = ids.to(device), a_mask.to(device)
            attn = torch.cat([p_mask.index_select(0, rows), a_mask], dim=1)
            pos = p_len.index_select(0, rows)[:, None] + torch.arange(
                width, device=device
            )
            kwargs: dict[str, Any] = {}
            if _accepts(model, "cache_position"):  # transformers 4.x
                start = p_mask.size(1)
                kwargs["cache_position"] = torch.arange(
                    start, start + width, device=device
                )
            logits = model(
                input_ids=ids,
                attention_mask=attn,
                position_ids=pos,
                use_cache=True,
                **kwargs,
                **{_cache_kwarg(model): _select_cache(cache, rows)},
            ).logits
            pieces.append(logits.to(first.dtype))
        # position t predicts label t + 1: [prompt's last | answer tokens but the
        # last | unused]; the metrics read exactly the rows of the full pass
        pieces.append(first.new_zeros((n, 1, first.size(-1))))
        window = torch.cat(pieces, dim=1)
        detail = [self._detail[i] for _, i, _ in batch]
        return self._batch_stats(window, labels.to(device), answers, guard, detail)

    def _verify_shared(
        self,
        todo: list[tuple[str, str]],
        enc: list[tuple[list[int], list[int]]],
        batch: list[tuple[int, int, list[int]]],
        stats: list[_SeqStats],
        which: str,
        tol: float,
    ) -> str:
        """Compare shared statistics with the full pass (kept); ``""`` when equal."""
        if not batch:
            return ""
        ref: dict[tuple[str, str, str], _SeqStats] = {}
        self._score_full(todo, enc, [i for _, i, _ in batch], which, ref)
        for (_, i, _), got in zip(batch, stats, strict=True):
            want = ref[(which, *todo[i])]
            self._scores[(which, *todo[i])] = want
            for name in ("avg_loss", "min_k", "min_k_pp", "em", "es"):
                x, y = getattr(got, name), getattr(want, name)
                if x is None or y is None:
                    same = x is y
                else:
                    same = math.isclose(x, y, rel_tol=tol, abs_tol=tol) or (
                        math.isnan(x) and math.isnan(y)
                    )
                if not same:
                    return f"{name} {x!r} != {y!r} (full pass) for {todo[i]!r}"
            if got.text != want.text:
                return f"text {got.text!r} != {want.text!r} for {todo[i]!r}"
        return ""

    # ----------------------------------------------------------------- generation
    def _encode_prompt(self, prompt: str) -> list[int]:
        ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and getattr(self.tokenizer, "add_bos_token", False):
            ids = [int(bos), *ids]
        ids = ids[-self.max_length :]
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
        return ids

    def generations(
        self, split: str, indices: Iterable[int] | None = None
    ) -> list[str]:
        """Greedy generations for items of a split (cached, batched, left padding)."""
        items = self.items(split)
        idx = list(range(len(items)) if indices is None else indices)
        self.prefetch_generations([(split, i) for i in idx])
        return [self._gens[(split, i)] for i in idx]

    def prefetch_generations(self, keys: Sequence[tuple[str, int]]) -> None:
        todo = list(dict.fromkeys(k for k in keys if k not in self._gens))
        if not todo:
            return
        from transformers import GenerationConfig

        gen_cfg = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
        )
        device = _device(self.model)
        enc = [
            self._encode_prompt(self.prompt(self.items(s)[i].question)) for s, i in todo
        ]
        order = sorted(range(len(todo)), key=lambda i: len(enc[i]))
        step = self.gen_batch_size
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            batch = collate(
                [(enc[i], [IGNORE_INDEX] * len(enc[i])) for i in idx],
                self.pad_id,
                "left",
            )
            width = batch["input_ids"].size(1)
            out = self.model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                generation_config=gen_cfg,
            )
            for j, i in enumerate(idx):
                new = out[j, width:].tolist()
                if self.eos_id is not None and self.eos_id in new:
                    new = new[: new.index(self.eos_id)]
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                self._gens[todo[i]] = text.strip()

    # -------------------------------------------------------------------- results
    def result(self, name: str) -> dict:
        """Compute (once) the result dict of a registered metric."""
        if name not in self._results:
            self._results[name] = get_metric(name).fn(self)
        return self._results[name]

    def reference_tr(self) -> np.ndarray:
        """Per-item ``forget_truth_ratio`` values of the reference logs."""
        ref = self.reference
        entry = ref.get("forget_truth_ratio") if isinstance(ref, dict) else None
        vbi = entry.get("value_by_index") if isinstance(entry, dict) else None
        if not vbi:
            raise P.MissingReferenceError(
                "forget_quality needs reference logs with "
                "reference['forget_truth_ratio']['value_by_index'] (the tofu_eval "
                "of the retrained model)"
            )
        return np.array(
            [v["score"] if isinstance(v, dict) else v for v in vbi.values()],
            dtype=np.float64,
        )

    def reference_auc(self) -> float:
        """Min-K% AUC of the reference logs, 0.5 when absent (privleak quirk)."""
        ref = self.reference
        entry = ref.get("mia_min_k") if isinstance(ref, dict) else None
        if isinstance(entry, dict) and entry.get("agg_value") is not None:
            return float(entry["agg_value"])
        if isinstance(entry, int | float):
            return float(entry)
        return 0.5


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameterless model
        return torch.device("cpu")


#: Tolerance on the statistics of prompt-shared scoring vs the full pass (relative
#: or absolute).  Only float32 / float64 models share prompts: in half precision
#: the full pass itself varies with the padding by more than that.
_SHARE_TOL: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float64: 1e-4}


def _fragile(
    tok_lp: torch.Tensor,
    vocab_lp: torch.Tensor,
    guard: float,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Flag positions where rounding alone could move statistics by > ``guard``.

    Two computations of the same logits (full pass vs prompt cache) differ by a
    few float32 ulps, which some statistics amplify:

    * ``em`` / ``es`` when a teacher-forced argmax is a near tie (top-2 log-prob
      gap ``<= 5 guard``): a flip changes them by ``1 / L``;
    * Min-K%++: ``z = (l - mu) / sd`` with ``var = E[l^2] - mu^2``, which
      cancels on flat distributions.  An offset ``d`` of the log-softmax row (its
      normaliser's rounding, ``<~ 2 eps max(1, |mu|)``) moves ``z`` by about
      ``d (|mu| / sd + |z| |var - mu^2| / (2 var))`` (~1e-3 for a random
      model, whose ``mu^2 / var ~ 3000``), and an error ``2 eps (1 + |l| +
      |mu|)`` of ``l - mu`` by that over ``sd``.  Compared with ``guard max(1,
      |z|)``.

    Trained models have peaked distributions and rarely a near tie: few of
    their rows are fragile.
    """
    if tok_lp.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    eps = torch.finfo(vocab_lp.dtype).eps if vocab_lp.is_floating_point() else 0.0
    lp = vocab_lp.detach()
    tie = torch.zeros(lp.size(0), dtype=torch.bool, device=lp.device)
    if lp.size(-1) > 1:
        top = lp.topk(2, dim=-1).values.double()
        tie = top[:, 0] - top[:, 1] <= 5 * guard
    tok = tok_lp.detach().double().to(lp.device).reshape(-1)
    mu, var = moments if moments is not None else P.vocab_moments(lp)
    mu2 = mu.square()
    var = var.clamp(min=1e-6)
    sd = var.sqrt()
    z = (tok - mu) / sd
    offset = 2 * eps * mu.abs().clamp(min=1.0)
    err = offset * (mu.abs() / sd + z.abs() * (var - mu2).abs() / (2 * var))
    err = err + 2 * eps * (1 + tok.abs() + mu.abs()) / sd
    return (tie | (err > guard * z.abs().clamp(min=1.0))).cpu()


#: Pairs of distinct prompts checked against the full pass (first batch).
_CHECK_PAIRS = 4
#: At most this many times ``batch_size`` answers per continuation pass.
_ANSWER_ROWS_FACTOR = 8


def _answer_rows(batch_size: int, prompt_width: int, answer_width: int) -> int:
    """Answers per continuation pass: about a full-pass batch's token count.

    An answer row feeds ``answer_width`` tokens where a full-pass row feeds
    ``prompt_width + answer_width + 1``; capped at ``_ANSWER_ROWS_FACTOR`` times
    ``batch_size`` (each row also holds a copy of its prompt's KV cache).
    """
    ratio = (prompt_width + answer_width + 1) // max(answer_width, 1)
    return batch_size * max(1, min(ratio, _ANSWER_ROWS_FACTOR))


def _check_subset(
    batch: list[tuple[int, int, list[int]]], fragile: list[bool], limit: int
) -> list[int]:
    """Pick up to ``limit`` non-fragile pairs of distinct prompts to check.

    Prompts spread over the chunk's rows, i.e. over its prompt lengths, from the
    shortest (most left padding) to the longest (none).
    """
    first: dict[int, int] = {}
    for k, ((row, _, _), bad) in enumerate(zip(batch, fragile, strict=True)):
        if not bad and row not in first:
            first[row] = k
    rows = sorted(first)
    if len(rows) > limit > 1:
        step = (len(rows) - 1) / (limit - 1)
        rows = [rows[round(n * step)] for n in range(limit)]
    return [first[r] for r in rows[:limit]]


def _share_tol(model: Any) -> tuple[float | None, str]:
    """Tolerance for ``model``, or ``(None, why)`` if it cannot share prompts.

    ``why`` is empty where not sharing is by design (half precision, an
    encoder-decoder, virtual-token adapters) and names the missing forward
    argument where the model's API would need it: the caller warns then.
    """
    expected, missing = _sharing_blockers(model)
    if expected or missing:
        return None, missing
    try:
        dtype = next(model.parameters()).dtype
    except StopIteration:  # pragma: no cover - parameterless model
        return None, ""
    return _SHARE_TOL.get(dtype), ""


def _prompt_len(labels: Sequence[int]) -> int:
    """Return the number of prompt tokens (labels ``-100``) of an encoded pair."""
    return next((k for k, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))


def _forward_params(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward
        return {}


def _accepts(model: Any, name: str) -> bool:
    return name in _forward_params(model)


def _sharing_blockers(model: Any) -> tuple[bool, str]:
    """Why ``model`` cannot score answers as continuations of a prompt KV cache.

    Returns ``(by_design, missing)``: ``by_design`` for an encoder-decoder or a
    virtual-token / input-dependent adapter (not a prefix cache), ``missing``
    naming the forward arguments the model lacks (``""`` when it has them).
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return True, ""
    peft_cfg = getattr(model, "active_peft_config", None)
    if peft_cfg is not None and (
        getattr(peft_cfg, "is_prompt_learning", False)
        or getattr(peft_cfg, "alora_invocation_tokens", None)
    ):
        return True, ""
    params = _forward_params(model)
    need = [_cache_kwarg(model), "position_ids"]
    missing = [n for n in need if n not in params]
    if not missing:
        return False, ""
    return False, "its forward takes no " + " / ".join(missing)


def _cache_kwarg(model: Any) -> str:
    """Name of the forward argument that takes a KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name is
    a deprecated alias, in the forward's kwargs and in its outputs).
    """
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _output_cache(out: Any) -> Any:
    """Return the KV cache of a forward's output, under either of its names."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def _cache_supported(cache: Any, width: int) -> bool:
    """Only growable full-attention caches (or sliding windows >= ``width`` tokens).

    ``width`` bounds the padded prompt + answer length, so a sliding window that
    wide never drops a token and behaves as full attention (as in the full pass,
    whose sequences are shorter still).
    """
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # pragma: no cover - very old transformers
        return False
    if type(cache) is not DynamicCache or not cache.layers:
        return False
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            continue
        window = getattr(layer, "sliding_window", None)
        if not isinstance(layer, DynamicLayer) or window is None:
            return False
        if int(window) < width:  # answers would need more context than it keeps
            return False
    return True


def _select_cache(cache: Any, rows: torch.Tensor) -> Any:
    """Return a new cache holding ``rows`` of ``cache`` (left untouched)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    new.batch_select_indices(rows)
    return new


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float64)))


# ========================================================================= metrics


def _prob_result(ctx: _Context, split: str) -> dict:
    stats = ctx.score(ctx.answer_pairs(split))
    vbi = {
        str(i): {"prob": math.exp(-s.avg_loss), "avg_loss": s.avg_loss}
        for i, s in enumerate(stats)
    }
    return {
        "agg_value": _mean([v["prob"] for v in vbi.values()]),
        "value_by_index": vbi,
    }


def _rouge_result(ctx: _Context, split: str) -> dict:
    items = ctx.items(split)
    gens = ctx.generations(split)
    vbi = {}
    for i, (it, gen) in enumerate(zip(items, gens, strict=True)):
        gt = it.answer.strip()
        vbi[str(i)] = {
            "rougeL_recall": P.rouge_l_recall(gt, gen),
            "rougeL_f1": P.rouge_l_f1(gt, gen),
            "input": it.question,
            "ground_truth": gt,
            "generation": gen,
        }
    agg = _mean([v["rougeL_recall"] for v in vbi.values()])
    return {"agg_value": agg, "value_by_index": vbi}


def _truth_ratios(ctx: _Context, split: str, correct: str) -> dict[str, float]:
    """Per-item truth ratios; items without the needed answers are skipped."""
    indices = ctx.tr_indices(split, correct)
    if not indices:
        need = "perturbed answers" + (
            " and a paraphrased answer" if correct == "para" else ""
        )
        raise ValueError(f"no item of split {split!r} has {need} (truth ratio)")
    items = ctx.items(split)
    para, pert = [], []
    for i in indices:
        it = items[i]
        p = ctx.prompt(it.question)
        c = ctx.correct_text(it, correct)
        para.append(ctx.score([(p, c)])[0].avg_loss)
        pert.append(
            [s.avg_loss for s in ctx.score([(p, a) for a in it.perturbed_answers])]
        )
    tr = P.truth_ratio(para, pert)
    return {str(i): float(v) for i, v in zip(indices, tr, strict=True)}


def _tr_result(ctx: _Context, split: str, correct: str, agg: Any) -> dict:
    tr = _truth_ratios(ctx, split, correct)
    return {
        "agg_value": agg(list(tr.values())),
        "value_by_index": {k: {"score": v} for k, v in tr.items()},
    }


def _mia_result(ctx: _Context, score_fn: Any) -> dict:
    scores = {s: [float(v) for v in score_fn(s)] for s in ("forget", "holdout")}
    out: dict[str, Any] = {"agg_value": P.roc_auc(scores["forget"], scores["holdout"])}
    for split, values in scores.items():
        out[split] = {
            "value_by_index": {str(i): {"score": v} for i, v in enumerate(values)}
        }
    return out


def _stat_scores(ctx: _Context, attr: str) -> Any:
    def fn(split: str) -> list[float]:
        return [getattr(s, attr) for s in ctx.score(ctx.answer_pairs(split))]

    return fn


@metric(name="forget_Q_A_Prob", direction="closer_to_reference", splits=("forget",))
def forget_q_a_prob(ctx: _Context) -> dict:
    """Mean ``exp(-avg_loss)`` of the forget answers (EOS included)."""
    return _prob_result(ctx, "forget")


@metric(name="forget_Q_A_ROUGE", direction="closer_to_reference", splits=("forget",))
def forget_q_a_rouge(ctx: _Context) -> dict:
    """Mean ROUGE-L recall of greedy answers to the forget questions."""
    return _rouge_result(ctx, "forget")


@metric(name="forget_truth_ratio", direction="higher", splits=("forget",))
def forget_truth_ratio(ctx: _Context) -> dict:
    """Truth ratio (paraphrase vs perturbed) on forget data, closer_to_1 aggregate."""
    return _tr_result(ctx, "forget", "para", P.tr_closer_to_1)


@metric(
    name="forget_quality", direction="higher", needs_reference=True, splits=("forget",)
)
def forget_quality(ctx: _Context) -> dict:
    """KS-test p-value of forget truth ratios vs the reference model's."""
    if ctx.reference is None:
        raise P.MissingReferenceError(
            "forget_quality needs `reference` (the tofu_eval dict of the retrained "
            "model); none was given"
        )
    ref = ctx.reference_tr()
    tr = [
        v["score"] for v in ctx.result("forget_truth_ratio")["value_by_index"].values()
    ]
    return {"agg_value": P.forget_quality(tr, ref), "value_by_index": {}}


@metric(name="retain_Q_A_Prob", direction="higher", splits=("retain",))
def retain_q_a_prob(ctx: _Context) -> dict:
    """Mean ``exp(-avg_loss)`` of the retain answers."""
    return _prob_result(ctx, "retain")


@metric(name="retain_Q_A_ROUGE", direction="higher", splits=("retain",))
def retain_q_a_rouge(ctx: _Context) -> dict:
    """Mean ROUGE-L recall of greedy answers to the retain questions."""
    return _rouge_result(ctx, "retain")


@metric(name="retain_Truth_Ratio", direction="higher", splits=("retain",))
def retain_truth_ratio(ctx: _Context) -> dict:
    """Truth ratio (paraphrase vs perturbed) on retain data, true_better aggregate."""
    return _tr_result(ctx, "retain", "para", P.tr_true_better)


@metric(name="gk_Q_A_Prob", direction="higher", splits=("general",))
def gk_q_a_prob(ctx: _Context) -> dict:
    """Normalised probability of the correct general answer against wrong options.

    ``P_c / (P_c + sum_j P_w,j + 1e-10)`` (open-unlearning
    ``probability_w_options``).  The correct option is the paraphrase when the item
    has one, else the answer (see ``_Context.correct_text``).  Items without
    perturbed options are skipped (the normalisation is undefined).
    """
    indices = ctx.tr_indices("general", "para_or_answer")
    if not indices:
        raise ValueError("no item of split 'general' has perturbed answers (gk Prob)")
    items = ctx.items("general")
    correct, wrong = [], []
    for i in indices:
        it = items[i]
        p = ctx.prompt(it.question)
        c = ctx.correct_text(it, "para_or_answer")
        correct.append(ctx.score([(p, c)])[0].avg_loss)
        wrong.append(
            [s.avg_loss for s in ctx.score([(p, a) for a in it.perturbed_answers])]
        )
    probs = P.normalised_prob_per_item(correct, wrong)
    vbi = {str(i): {"prob": float(v)} for i, v in zip(indices, probs, strict=True)}
    return {"agg_value": float(probs.mean()), "value_by_index": vbi}


@metric(name="gk_Q_A_ROUGE", direction="higher", splits=("general",))
def gk_q_a_rouge(ctx: _Context) -> dict:
    """Mean ROUGE-L recall of greedy answers to the general-knowledge probes."""
    return _rouge_result(ctx, "general")


@metric(name="gk_Truth_Ratio", direction="higher", splits=("general",))
def gk_truth_ratio(ctx: _Context) -> dict:
    """Truth ratio (paraphrase-or-answer vs perturbed) on the probes, true_better."""
    return _tr_result(ctx, "general", "para_or_answer", P.tr_true_better)


#: The six numbers behind ``model_utility`` (the general triple counts twice).
MODEL_UTILITY_PARTS = (
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "gk_Q_A_Prob",
    "gk_Q_A_ROUGE",
    "gk_Truth_Ratio",
)


@metric(name="model_utility", direction="higher", splits=("retain", "general"))
def model_utility(ctx: _Context) -> dict:
    """Harmonic mean of 9 utility numbers (general triple used for RA and WF)."""
    parts = {name: float(ctx.result(name)["agg_value"]) for name in MODEL_UTILITY_PARTS}
    nine = [
        parts["retain_Q_A_Prob"],
        parts["retain_Q_A_ROUGE"],
        parts["retain_Truth_Ratio"],
        *[parts[n] for n in MODEL_UTILITY_PARTS[3:]]
        * 2,  # real-authors + world-facts slots
    ]
    return {
        "agg_value": P.model_utility(nine),
        "value_by_index": {},
        "components": parts,
    }


_MIA_SPLITS = ("forget", "holdout")


@metric(name="mia_loss", direction="closer_to_reference", splits=_MIA_SPLITS)
def mia_loss(ctx: _Context) -> dict:
    """AUC of the LOSS attack (average answer loss), forget = 0 vs holdout = 1."""
    return _mia_result(ctx, _stat_scores(ctx, "avg_loss"))


@metric(name="mia_zlib", direction="closer_to_reference", splits=_MIA_SPLITS)
def mia_zlib(ctx: _Context) -> dict:
    """AUC of the ZLib attack (loss / zlib length of the decoded answer)."""

    def fn(split: str) -> list[float]:
        stats = ctx.score(ctx.answer_pairs(split))
        return [P.mia_zlib(s.avg_loss, s.text) for s in stats]

    return _mia_result(ctx, fn)


@metric(name="mia_min_k", direction="closer_to_reference", splits=_MIA_SPLITS)
def mia_min_k(ctx: _Context) -> dict:
    """AUC of the Min-K% Prob attack (k = 0.4)."""
    return _mia_result(ctx, _stat_scores(ctx, "min_k"))


@metric(name="mia_min_k_plus_plus", direction="closer_to_reference", splits=_MIA_SPLITS)
def mia_min_k_plus_plus(ctx: _Context) -> dict:
    """AUC of the Min-K%++ attack (k = 0.4)."""
    return _mia_result(ctx, _stat_scores(ctx, "min_k_pp"))


@metric(name="mia_gradnorm", direction="closer_to_reference", splits=_MIA_SPLITS)
def mia_gradnorm(ctx: _Context) -> dict:
    """AUC of the GradNorm attack (batch of one, p = 2, trainable tensors only)."""

    def fn(split: str) -> list[float]:
        out = []
        for p, a in ctx.answer_pairs(split):
            enc = encode_qa(ctx.tokenizer, p, a, ctx.max_length)
            out.append(P.gradnorm_score(ctx.model, collate([enc], ctx.pad_id)))
        return out

    return _mia_result(ctx, fn)


@metric(
    name="mia_reference",
    direction="closer_to_reference",
    needs_reference=True,
    splits=_MIA_SPLITS,
)
def mia_reference(ctx: _Context) -> dict:
    """AUC of the reference attack (target loss minus reference-model loss).

    The reference losses come from ``reference_model`` when one is given, else from
    the reference logs: the per-item scores of the reference's LOSS attack
    (``reference["mia_loss"][split]["value_by_index"]``) are exactly its average
    answer losses on the same forget / holdout items, so the retrain oracle's
    saved evaluation serves as the reference model without loading it again.
    """
    logged = None if ctx.reference_model is not None else _reference_losses(ctx)
    if ctx.reference_model is None and logged is None:
        raise P.MissingReferenceError(
            "mia_reference needs `reference_model=` or reference logs with per-item "
            "mia_loss scores for the forget and holdout splits; neither was given"
        )

    def fn(split: str) -> list[float]:
        pairs = ctx.answer_pairs(split)
        tgt = [t.avg_loss for t in ctx.score(pairs, "target")]
        if logged is not None:
            ref = logged[split]
        else:
            ref = [r.avg_loss for r in ctx.score(pairs, "reference")]
        return [P.mia_reference(t, r) for t, r in zip(tgt, ref, strict=True)]

    return _mia_result(ctx, fn)


def _reference_losses(ctx: _Context) -> dict[str, list[float]] | None:
    """Per-item forget / holdout losses from the reference logs (None if unusable)."""
    ref = ctx.reference
    entry = ref.get("mia_loss") if isinstance(ref, dict) else None
    if not isinstance(entry, dict):
        return None
    out: dict[str, list[float]] = {}
    for split in ("forget", "holdout"):
        n = len(ctx.items(split))
        vbi = (entry.get(split) or {}).get("value_by_index")
        if not isinstance(vbi, dict) or len(vbi) != n:
            return None
        try:
            out[split] = [float(vbi[str(i)]["score"]) for i in range(n)]
        except (KeyError, TypeError, ValueError):
            return None
    return out


@metric(name="privleak", direction="closer_to_reference", splits=_MIA_SPLITS)
def privleak(ctx: _Context) -> dict:
    """PrivLeak of the Min-K% AUC against the reference's (0.5 when absent)."""
    auc = float(ctx.result("mia_min_k")["agg_value"])
    ref = ctx.reference_auc()
    return {
        "agg_value": P.privleak(auc, ref),
        "value_by_index": {},
        "auc": auc,
        "reference_auc": ref,
    }


@metric(name="exact_memorization", direction="lower", splits=("forget",))
def exact_memorization(ctx: _Context) -> dict:
    """Mean teacher-forced exact memorization of the forget answers (EOS excluded)."""
    stats = ctx.score(ctx.answer_pairs("forget"))
    vbi = {str(i): {"score": s.em} for i, s in enumerate(stats)}
    values = [s.em for s in stats if s.em is not None]
    if not values:
        raise ValueError("exact_memorization: no forget answer has a token besides EOS")
    return {"agg_value": _mean(values), "value_by_index": vbi}


@metric(name="extraction_strength", direction="lower", splits=("forget",))
def extraction_strength(ctx: _Context) -> dict:
    """Mean extraction strength of the forget answers (ES = 1/L on no match)."""
    stats = ctx.score(ctx.answer_pairs("forget"))
    vbi = {str(i): {"score": s.es} for i, s in enumerate(stats)}
    return {"agg_value": _mean([s.es for s in stats]), "value_by_index": vbi}


def _fluency_result(ctx: _Context, split: str) -> dict:
    gens = ctx.generations(split)
    vbi = {
        str(i): {"score": P.fluency_proxy(g), "generation": g}
        for i, g in enumerate(gens)
    }
    return {
        "agg_value": _mean([v["score"] for v in vbi.values()]),
        "value_by_index": vbi,
    }


@metric(name="forget_fluency", direction="higher", splits=("forget",))
def forget_fluency(ctx: _Context) -> dict:
    """Mean fluency proxy of greedy answers to the forget questions (gibberish)."""
    return _fluency_result(ctx, "forget")


@metric(name="retain_fluency", direction="higher", splits=("retain",))
def retain_fluency(ctx: _Context) -> dict:
    """Mean fluency proxy of greedy answers to the retain questions."""
    return _fluency_result(ctx, "retain")


#: Metrics computed by :func:`evaluate` by default, in output order.
TOFU_METRICS: tuple[str, ...] = (
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "forget_truth_ratio",
    "forget_quality",
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "gk_Q_A_Prob",
    "gk_Q_A_ROUGE",
    "gk_Truth_Ratio",
    "model_utility",
    "mia_loss",
    "mia_zlib",
    "mia_min_k",
    "mia_min_k_plus_plus",
    "mia_gradnorm",
    "mia_reference",
    "privleak",
    "exact_memorization",
    "extraction_strength",
    "forget_fluency",
    "retain_fluency",
)

# Dependencies between metrics (for the prefetch plan).
_DEPS: dict[str, tuple[str, ...]] = {
    "forget_quality": ("forget_truth_ratio",),
    "model_utility": MODEL_UTILITY_PARTS,
    "privleak": ("mia_min_k",),
}
# What each metric reads: (kind, split) with kind in answer / tr_para / tr_answer /
# gen / ref_answer.
_NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "forget_Q_A_Prob": (("answer", "forget"),),
    "forget_Q_A_ROUGE": (("gen", "forget"),),
    "forget_truth_ratio": (("tr_para", "forget"),),
    "retain_Q_A_Prob": (("answer", "retain"),),
    "retain_Q_A_ROUGE": (("gen", "retain"),),
    "retain_Truth_Ratio": (("tr_para", "retain"),),
    "gk_Q_A_Prob": (("tr_answer", "general"),),
    "gk_Q_A_ROUGE": (("gen", "general"),),
    "gk_Truth_Ratio": (("tr_answer", "general"),),
    "mia_loss": (("answer", "forget"), ("answer", "holdout")),
    "mia_zlib": (("answer", "forget"), ("answer", "holdout")),
    "mia_min_k": (("answer", "forget"), ("answer", "holdout")),
    "mia_min_k_plus_plus": (("answer", "forget"), ("answer", "holdout")),
    "mia_reference": (
        ("answer", "forget"),
        ("answer", "holdout"),
        ("ref_answer", "forget"),
        ("ref_answer", "holdout"),
    ),
    "exact_memorization": (("answer", "forget"),),
    "extraction_strength": (("answer", "forget"),),
    "forget_fluency": (("gen", "forget"),),
    "retain_fluency": (("gen", "retain"),),
}


def _prefetch(ctx: _Context, names: Sequence[str]) -> None:
    """Score / generate everything the metrics need in as few batches as possible."""
    closure: list[str] = []
    stack = list(names)
    while stack:
        n = stack.pop()
        if n not in closure:
            closure.append(n)
            stack.extend(_DEPS.get(n, ()))
    needs = {need for n in closure for need in _NEEDS.get(n, ())}
    pairs: list[tuple[str, str]] = []
    ref_pairs: list[tuple[str, str]] = []
    gens: list[tuple[str, int]] = []
    for split in SPLIT_NAMES:
        if ("answer", split) in needs:
            pairs += ctx.answer_pairs(split)
        if ("tr_para", split) in needs:
            pairs += ctx.tr_pairs(split, "para")
        if ("tr_answer", split) in needs:
            pairs += ctx.tr_pairs(split, "para_or_answer")
        if ("ref_answer", split) in needs and ctx.reference_model is not None:
            ref_pairs += ctx.answer_pairs(split)
        if ("gen", split) in needs:
            gens += [(split, i) for i in range(len(ctx.items(split)))]
    ctx.score(pairs)
    if ref_pairs:
        ctx.score(ref_pairs, "reference")
    ctx.prefetch_generations(gens)


def _check_tokenizer(model: Any, tokenizer: Any, what: str) -> None:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and int(vocab) < len(tokenizer):
        raise ValueError(
            f"tokenizer/{what} mismatch: the {what}'s config.vocab_size is {vocab} "
            f"but the tokenizer has {len(tokenizer)} tokens"
        )


def _select_metrics(
    metrics: Sequence[str] | None,
    reference: dict | None,
    reference_model: Any,
    gradnorm: bool,
) -> list[str]:
    if metrics is None:
        names = [
            n
            for n in TOFU_METRICS
            if (n != "forget_quality" or reference is not None)
            and (n != "mia_gradnorm" or gradnorm)
            and (
                n != "mia_reference"
                or _has_reference_losses(reference_model, reference)
            )
        ]
        return names
    if isinstance(metrics, str):
        metrics = [metrics]
    names = list(dict.fromkeys(metrics))
    for n in names:
        get_metric(n)  # ValueError listing the valid names
    if gradnorm and "mia_gradnorm" not in names:
        names.append("mia_gradnorm")
    if "forget_quality" in names and reference is None:
        raise P.MissingReferenceError(
            "metric 'forget_quality' was requested but no `reference` (the tofu_eval "
            "dict of the retrained model) was given"
        )
    if "mia_reference" in names and not _has_reference_losses(
        reference_model, reference
    ):
        raise P.MissingReferenceError(
            "metric 'mia_reference' was requested but neither a `reference_model` "
            "nor reference logs with per-item mia_loss scores were given"
        )
    return names


def _has_reference_losses(reference_model: Any, reference: dict | None) -> bool:
    """Whether ``mia_reference`` has a reference model or logged reference losses."""
    if reference_model is not None:
        return True
    entry = reference.get("mia_loss") if isinstance(reference, dict) else None
    return isinstance(entry, dict) and all(
        isinstance((entry.get(s) or {}).get("value_by_index"), dict)
        for s in ("forget", "holdout")
    )


def evaluate(
    model: Any,
    tokenizer: Any,
    prompt_fn: PromptFn,
    splits: EvalSplits,
    reference: dict | None = None,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    max_length: int = 256,
    metrics: Sequence[str] | None = None,
    gradnorm: bool = False,
    num_samples: int = 5,
    reference_model: Any = None,
    share_prompts: bool = True,
    gen_batch_size: int | None = None,
    merge_lora: bool = True,
) -> tuple[dict, dict]:
    """Evaluate a causal LM with the TOFU / open-unlearning metric suite.

    Probabilities are teacher-forced on ``prompt_fn(question) + answer + EOS``
    (answer-only labels, :func:`~fed_unlearn.data.qa.encode_qa`); generations are
    greedy (``do_sample=False``), left padded, cut at EOS and stripped.

    Parameters
    ----------
    model : transformers.PreTrainedModel or peft.PeftModel
        The causal LM to evaluate; its train/eval mode is restored afterwards.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer (needs an EOS or a pad token).
    prompt_fn : PromptFn
        Maps a question to the full prompt text.
    splits : EvalSplits
        Forget / retain / holdout / general items.
    reference : dict or None
        ``tofu_eval`` of the reference (retrained) model.  Used by
        ``forget_quality`` (its ``forget_truth_ratio`` value_by_index) and
        ``privleak`` (its ``mia_min_k`` agg_value; 0.5 when absent).
    batch_size : int
        Batch size for scoring and generation.
    max_new_tokens : int
        Generation length.
    max_length : int
        Maximum tokens per scored sequence (prompt truncated from the left).
    metrics : Sequence[str] or None
        Metric names to compute (see
        :func:`~fed_unlearn.metrics.registry.list_metrics`).  ``None`` = all of
        :data:`TOFU_METRICS` that apply: ``forget_quality`` only with ``reference``,
        ``mia_gradnorm`` only with ``gradnorm=True``, ``mia_reference`` only with
        ``reference_model`` or with ``reference`` logs holding per-item
        ``mia_loss`` scores (the reference's own answer losses).
    gradnorm : bool
        Also compute ``mia_gradnorm`` (one backward per forget/holdout item;
        zeroes the model's gradients).
    num_samples : int
        Number of forget / retain generations copied to ``tofu_eval["generations"]``.
    reference_model : transformers.PreTrainedModel or None
        Reference model (same tokenizer) for ``mia_reference``.
    share_prompts : bool
        Teacher-forced scoring runs each unique prompt once and scores all its
        answers (answer, paraphrase, perturbed answers) as continuations of the
        prompt's KV cache: the same statistics as one full forward pass per pair
        (within 1e-4; checked on a few pairs of the first batch of each model,
        which falls back with a ``RuntimeWarning`` if its cache cannot reproduce
        the full pass).  fp32/fp64 models only; pairs whose statistics float32
        rounding alone could move (near-tie argmax, Min-K%++ of flat
        distributions; checked on the forget / holdout answers, the only pairs
        whose EM, ES and Min-K%++ a metric reads) and prompts with a single
        answer use the full pass, and so does everything when most checked
        pairs are such (e.g. a randomly initialised model).  ``False`` always
        uses one full forward pass per pair.
    gen_batch_size : int or None
        Batch size of greedy generation (default: ``max(batch_size, 64)``).
    merge_lora : bool
        Fold a peft LoRA adapter into the base weights while evaluating (see
        :func:`merged_lora`; the weights are restored bit-exactly). Ignored with
        ``gradnorm=True`` or a ``reference_model``.

    Returns
    -------
    tuple[dict, dict]
        ``(tofu_eval, tofu_summary)``: ``tofu_eval[name]`` holds ``agg_value`` and
        ``value_by_index`` (MIA metrics: ``agg_value`` = AUC plus ``forget`` /
        ``holdout`` ``value_by_index``), and ``tofu_eval["generations"]`` the
        sample generations; ``tofu_summary[name]`` is the ``agg_value``.

    Raises
    ------
    ValueError
        On an unknown metric name, a tokenizer/model vocabulary mismatch, an empty
        split needed by a requested metric, or no item usable for a truth ratio.
    MissingReferenceError
        If ``forget_quality`` / ``mia_reference`` is requested explicitly without
        ``reference`` / ``reference_model``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = _select_metrics(metrics, reference, reference_model, gradnorm)
    _check_tokenizer(model, tokenizer, "model")
    if reference_model is not None:
        _check_tokenizer(reference_model, tokenizer, "reference model")
    for n in names:
        for split in get_metric(n).splits:
            if not getattr(splits, split):
                raise ValueError(
                    f"metric {n!r} needs a non-empty {split!r} split, but it is empty"
                )

    ctx = _Context(
        model,
        tokenizer,
        prompt_fn,
        splits,
        reference,
        reference_model,
        batch_size,
        max_new_tokens,
        max_length,
        share_prompts,
        gen_batch_size,
    )
    models = [m for m in (model, reference_model) if m is not None]
    modes = [P._module_modes(m) for m in models]
    # gradnorm needs the adapter's own gradients; a reference model may share the
    # base weights: evaluate those unmerged
    merge = merge_lora and not gradnorm and reference_model is None
    try:
        for m in models:
            m.eval()
        with (
            torch.no_grad(),
            merged_lora(model) if merge else contextlib.nullcontext(),
        ):
            _prefetch(ctx, names)
            tofu_eval = {n: ctx.result(n) for n in names}
            samples = {}
            for split in ("forget", "retain"):
                items = ctx.items(split)
                k = min(max(num_samples, 0), len(items))
                gens = ctx.generations(split, range(k))
                samples[split] = [
                    {
                        "question": it.question,
                        "ground_truth": it.answer,
                        "generation": g,
                    }
                    for it, g in zip(items[:k], gens, strict=True)
                ]
    finally:
        for m in modes:
            P._restore_modes(m)
    tofu_eval["generations"] = samples
    tofu_summary = {n: float(tofu_eval[n]["agg_value"]) for n in names}
    return tofu_eval, tofu_summary


__all__ = ["METRIC_REGISTRY", "TOFU_METRICS", "EvalSplits", "evaluate", "merged_lora"]
