"""Input subspaces of the adapted layers (SFU): Gram matrices, energy bases, projection.

A remaining client summarises the inputs its items feed into every adapted
layer as one Gram matrix per layer, ``G = sum_i lambda_i x_i x_i^T`` over all
non-padding tokens ``i`` (``lambda_i > 0`` random scales the client keeps); the
server sums the clients' matrices. For ``R = [sqrt(lambda_i) x_i]_i`` (the
stacked, scaled inputs, ``d_in x n``) the sum is ``R R^T``, whose
eigenvectors are the left singular vectors of ``R`` and whose eigenvalues are
its squared singular values: the basis :func:`energy_basis` keeps is the SVD
basis of the stacked representations, with no representation ever sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from fed_unlearn.data.qa import PromptFn, collate, encode_qa
from fed_unlearn.types import AdapterState, QAItem

#: Marker of the adapter tensors whose input side SFU projects.
LORA_A = ".lora_A."


def energy_basis(gram: torch.Tensor, energy: float) -> torch.Tensor:
    """Top eigenvectors of a Gram matrix holding ``energy`` of its trace.

    Parameters
    ----------
    gram : torch.Tensor
        ``d x d`` symmetric positive semi-definite matrix (``R R^T``).
    energy : float
        ε in (0, 1]: keep the smallest ``k`` with ``sum_{j<=k} s_j >= ε sum_j s_j``
        (``s`` the eigenvalues, descending; the SVD rule
        ``‖R_k‖_F² >= ε ‖R‖_F²``).

    Returns
    -------
    torch.Tensor
        ``d x k`` orthonormal columns (float64); ``d x 0`` for a zero matrix.

    Raises
    ------
    ValueError
        A matrix that is not square or an ``energy`` outside (0, 1].
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"a Gram matrix is square, got shape {tuple(gram.shape)}")
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    g = gram.double()
    vals, vecs = torch.linalg.eigh((g + g.T) / 2)
    vals, vecs = vals.flip(0).clamp(min=0), vecs.flip(1)
    total = float(vals.sum())
    if total <= 0:
        return vecs[:, :0]
    share = vals.cumsum(0) / total
    # the SVD rule of the spec's energy_basis: U[:, :#(share < ε) + 1]
    k = min(int((share < energy - 1e-12).sum()) + 1, vals.numel())
    return vecs[:, :k]


def project_off(delta_a: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``ΔA (I − U Uᵀ)``: remove the basis' span from the input side of ``ΔA``.

    Parameters
    ----------
    delta_a : torch.Tensor
        ``r x d_in`` update of a LoRA ``A``.
    basis : torch.Tensor
        ``d_in x k`` orthonormal columns ``U``.

    Returns
    -------
    torch.Tensor
        The projected update, in ``delta_a``'s dtype.

    Raises
    ------
    ValueError
        If the inner dimensions differ.
    """
    if delta_a.dim() != 2 or basis.dim() != 2 or delta_a.shape[1] != basis.shape[0]:
        raise ValueError(
            f"project_off: ΔA {tuple(delta_a.shape)} and basis "
            f"{tuple(basis.shape)} do not share d_in"
        )
    d = delta_a.double()
    u = basis.double()
    return (d - (d @ u) @ u.T).to(delta_a.dtype)


def _lora_a_inputs(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Adapter key of each ``lora_A`` weight -> the module it multiplies."""
    out: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if LORA_A in f"{name}." and isinstance(module, torch.nn.Linear):
            out[name.replace(".default", "") + ".weight"] = module
    return out


@contextlib.contextmanager
def _capture(
    modules: Mapping[str, torch.nn.Module],
    grams: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> Iterator[None]:
    """Add ``sum_i lambda_i x_i x_i^T`` of each module's inputs into ``grams``."""

    def hook(key: str) -> Any:
        def pre(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().double()
            rows = x[state["mask"].to(x.device)]  # [n_tokens, d_in]
            lam = state["lam"].to(x.device)
            grams[key] += ((rows * lam[:, None]).T @ rows).cpu()

        return pre

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def layer_input_grams(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_fn: PromptFn,
    items: Sequence[QAItem],
    max_length: int,
    generator: torch.Generator,
    batch_size: int = 16,
) -> tuple[AdapterState, int]:
    """Per adapted layer, the scaled Gram matrix of its inputs over ``items``.

    Parameters
    ----------
    model : peft.PeftModel
        Adapted model (evaluated in eval mode; its mode is restored).
    tokenizer : PreTrainedTokenizerBase
        Its tokenizer.
    prompt_fn : PromptFn
        Prompt format.
    items : Sequence[QAItem]
        Items whose prompt and answer tokens are forwarded.
    max_length : int
        Token limit per item.
    generator : torch.Generator
        Source of the scales ``lambda_i ~ U(0, 1]``, one per token.
    batch_size : int
        Items per forward.

    Returns
    -------
    tuple[AdapterState, int]
        ``lora_A`` key -> ``d_in x d_in`` float32 matrix, and the tokens summed.

    Raises
    ------
    ValueError
        No items, or a model without LoRA ``A`` layers.
    """
    if not items:
        raise ValueError("layer_input_grams needs at least one item")
    modules = _lora_a_inputs(model)
    if not modules:
        raise ValueError("the model has no LoRA A layers to take inputs of")
    grams = {
        k: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)  # type: ignore[arg-type]
        for k, m in modules.items()
    }
    state: dict[str, Any] = {}
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        with _capture(modules, grams, state):
            for s in range(0, len(items), batch_size):
                enc = [
                    encode_qa(tokenizer, prompt_fn(it.question), it.answer, max_length)
                    for it in items[s : s + batch_size]
                ]
                batch = collate(enc, int(tokenizer.pad_token_id))
                mask = batch["attention_mask"].bool()
                n = int(mask.sum())
                state["mask"] = mask
                state["lam"] = 1.0 - torch.rand(
                    n, generator=generator, dtype=torch.float64
                )
                model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                )
                tokens += n
    finally:
        model.train(was_training)
    return {k: g.float() for k, g in grams.items()}, tokens


def gram_membership_scores(
    gram: torch.Tensor, reference: torch.Tensor, candidates: Sequence[torch.Tensor]
) -> list[float]:
    """Score candidates' tokens for membership in a client's Gram matrix.

    The attack of ``docs/methods/sfu.md``: the attacker holds the model, the
    candidate items and a Gram matrix of public data (``reference``); it scores
    how much more of each token's energy the client's trace-normalised Gram
    matrix ``Ĝ = G / tr G`` holds than the reference's,
    ``mean_t x_tᵀ (Ĝ − Ĝ_ref) x_t / ‖x_t‖²`` over a candidate's tokens. Higher =
    more likely a member.

    Parameters
    ----------
    gram, reference : torch.Tensor
        ``d x d`` Gram matrices (the client's and the public reference's).
    candidates : Sequence[torch.Tensor]
        Per candidate, ``n x d``: its token inputs to the same layer.

    Returns
    -------
    list[float]
        One score per candidate.

    Raises
    ------
    ValueError
        Shapes that do not fit, or a matrix of zero trace.
    """
    if gram.shape != reference.shape:
        raise ValueError(
            f"the reference {tuple(reference.shape)} differs from the Gram matrix "
            f"{tuple(gram.shape)}"
        )
    g, r = gram.double(), reference.double()
    tg, tr = float(torch.trace(g)), float(torch.trace(r))
    if tg <= 0 or tr <= 0:
        raise ValueError("a Gram matrix with zero trace has no energy to compare")
    diff = g / tg - r / tr
    out = []
    for x in candidates:
        if x.dim() != 2 or x.shape[1] != g.shape[0]:
            raise ValueError(
                f"inputs {tuple(x.shape)} do not fit the Gram matrix {tuple(g.shape)}"
            )
        x = x.double()
        norms = (x * x).sum(1).clamp_min(1e-30)
        out.append(float((((x @ diff) * x).sum(1) / norms).mean()))
    return out


@torch.no_grad()
def layer_token_inputs(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_fn: PromptFn,
    items: Sequence[QAItem],
    max_length: int,
) -> list[dict[str, torch.Tensor]]:
    """Per item, its tokens' inputs to every LoRA A (the attacker's side).

    Parameters
    ----------
    model : peft.PeftModel
        Adapted model (evaluated in eval mode; its mode is restored).
    tokenizer : PreTrainedTokenizerBase
        Its tokenizer.
    prompt_fn : PromptFn
        Prompt format.
    items : Sequence[QAItem]
        Candidate items.
    max_length : int
        Token limit per item.

    Returns
    -------
    list[dict[str, torch.Tensor]]
        Per item: ``lora_A`` key -> ``n_tokens x d_in`` (float64).
    """
    modules = _lora_a_inputs(model)
    out: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}

    def hook(key: str) -> Any:
        def pre(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            current[key] = args[0].detach().double().reshape(-1, args[0].shape[-1])

        return pre

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        for it in items:
            enc = encode_qa(tokenizer, prompt_fn(it.question), it.answer, max_length)
            batch = collate([enc], int(tokenizer.pad_token_id))
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            out.append({k: v.cpu() for k, v in current.items()})
            current.clear()
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return out
