"""Teacher-forced scoring of (prompt, answer) pairs, shared by all metrics.

:class:`Scorer` computes the statistics every teacher-forced metric reads
(:class:`SeqStats`: average loss, Min-K%, Min-K%++, exact memorization,
extraction strength, decoded answer) once per (model, prompt, answer) and caches
them.  Two ways to compute them, with the same results:

* the plain pass (:meth:`Scorer._score_full`): one full forward pass per pair,
  batched, sorted by length, right padding;
* the KV-sharing pass (:meth:`Scorer._score_shared`): each unique prompt runs
  once (batched, left padding) and its answers are scored as continuations of
  its KV cache (batched, right padding).  It is checked against the plain pass
  on a few pairs of each model, guarded against float32 rounding
  (:func:`_fragile`), and falls back to the plain pass where it cannot be used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fed_unlearn.data.qa import IGNORE_INDEX, collate, encode_qa
from fed_unlearn.metrics import primitives as P
from fed_unlearn.metrics.model_api import (
    accepts,
    cache_kwarg,
    cache_supported,
    model_device,
    output_cache,
    select_cache,
    sharing_blockers,
)

#: ``k`` used by Min-K% / Min-K%++ (TOFU / MUSE configs).
MIA_K = P.MIN_K_DEFAULT


@dataclass(frozen=True)
class SeqStats:
    """Teacher-forced statistics of one (prompt, answer) pair."""

    avg_loss: float
    min_k: float
    min_k_pp: float  # nan outside the forget / holdout answers (see _detail)
    em: float | None  # None there too
    es: float | None
    text: str


class Scorer:
    """Cached, batched teacher-forced statistics of (prompt, answer) pairs.

    Parameters
    ----------
    model : Any
        The target causal LM (``which="target"``).
    tokenizer : Any
        Its tokenizer.
    reference_model : Any
        The reference model (``which="reference"``), or None.
    pad_id : int
        Padding token id.
    batch_size : int
        Rows per full-pass batch (and prompts per KV-sharing chunk).
    max_length : int
        Maximum tokens per scored sequence (prompt truncated from the left).
    share_prompts : bool
        Try the KV-sharing pass before the plain one.
    detail_pairs : set[tuple[str, str]]
        Pairs whose per-position statistics (Min-K%++, EM, ES) some metric reads;
        the others get only their loss, Min-K% and text (``min_k_pp`` nan, ``em``
        and ``es`` None).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        reference_model: Any,
        pad_id: int,
        batch_size: int,
        max_length: int,
        share_prompts: bool,
        detail_pairs: set[tuple[str, str]],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.reference_model = reference_model
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.max_length = max_length
        self.share_prompts = share_prompts
        self._scores: dict[tuple[str, str, str], SeqStats] = {}
        # which model -> whether prompt sharing was verified (True) or refused (False)
        self._share_ok: dict[str, bool] = {}
        self._share_counts: dict[str, list[int]] = {}
        # Pairs whose per-position statistics (Min-K%++, EM, ES) some metric reads:
        # the forget / holdout answers. Other pairs (truth-ratio options, retain
        # and probe answers) need only their loss and token log-probs, so neither
        # the vocabulary moments nor the rounding guard run for them.
        self._detail_pairs = detail_pairs
        self._detail: list[bool] = []  # per pair of the current _score_uncached

    def _model(self, which: str) -> Any:
        return self.model if which == "target" else self.reference_model

    def score(
        self, pairs: Sequence[tuple[str, str]], which: str = "target"
    ) -> list[SeqStats]:
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
    ) -> tuple[list[SeqStats], list[bool]]:
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
                SeqStats(
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
        store: dict[tuple[str, str, str], SeqStats],
    ) -> None:
        """Score ``todo[i]`` (``i`` in ``indices``): one full forward pass per pair.

        Batched, sorted by length, right padding.
        """
        model = self._model(which)
        device = model_device(model)
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
        device = model_device(model)
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
        if accepts(model, "logits_to_keep"):
            kwargs["logits_to_keep"] = 1
        if accepts(model, "cache_position"):  # transformers 4.x
            kwargs["cache_position"] = torch.arange(width, device=device)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **kwargs,
        )
        cache = output_cache(out)
        if not cache_supported(cache, width + self.max_length):
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
    ) -> tuple[list[SeqStats], list[bool]]:
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
            if accepts(model, "cache_position"):  # transformers 4.x
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
                **{cache_kwarg(model): select_cache(cache, rows)},
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
        stats: list[SeqStats],
        which: str,
        tol: float,
    ) -> str:
        """Compare shared statistics with the full pass (kept); ``""`` when equal."""
        if not batch:
            return ""
        ref: dict[tuple[str, str, str], SeqStats] = {}
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
    expected, missing = sharing_blockers(model)
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
