"""Key-wise arithmetic, flattening and validation of LoRA adapter state dicts.

An adapter state is what peft's ``get_peft_model_state_dict(model)`` returns: a
mapping from parameter names such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (shape
``[r, in]``) and the matching ``...lora_B.weight`` (shape ``[out, r]``) to
tensors. The adapted weight of a module is ``W0 + s * B @ A`` with a constant
scaling ``s``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch

from fed_unlearn.types import AdapterState

__all__ = [
    "InvalidUpdateError",
    "add",
    "flatten",
    "lora_pairs",
    "nbytes",
    "scale",
    "sub",
    "unflatten",
    "validate_update",
]

#: ``<prefix>.lora_A<suffix>`` / ``<prefix>.lora_embedding_B<suffix>``; the
#: suffix is ``.weight`` for linear layers and empty for peft embedding factors.
_LORA_RE = re.compile(
    r"^(?P<prefix>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?P<suffix>\..+)?$"
)

#: How many keys / problems an error message lists before "... (N more)".
_FEW = 5


class InvalidUpdateError(ValueError):
    """A client update does not fit the reference adapter.

    Raised by :func:`validate_update`; the message names every problem found
    (missing or unexpected keys, wrong shapes, non-floating dtypes, NaN/Inf).
    """


def _few(items: Iterable[object], n: int = _FEW) -> str:
    """Format the first ``n`` items of ``items`` (sorted) for an error message."""
    lst = sorted(str(i) for i in items)
    head = ", ".join(lst[:n])
    return head if len(lst) <= n else f"{head}, ... ({len(lst) - n} more)"


def _check_compatible(a: AdapterState, b: AdapterState, op: str) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same keys and shapes."""
    ka, kb = set(a), set(b)
    if ka != kb:
        parts = []
        if ka - kb:
            parts.append(f"only in the first: {_few(ka - kb)}")
        if kb - ka:
            parts.append(f"only in the second: {_few(kb - ka)}")
        raise ValueError(f"{op}: adapter keys differ ({'; '.join(parts)})")
    for k in sorted(ka):
        if a[k].shape != b[k].shape:
            raise ValueError(
                f"{op}: shape mismatch for {k!r}: {tuple(a[k].shape)} vs "
                f"{tuple(b[k].shape)}"
            )


def flatten(state: AdapterState) -> torch.Tensor:
    """Concatenate all tensors of an adapter into one vector.

    Parameters
    ----------
    state : AdapterState
        The adapter (or delta). All tensors must be on the same device.

    Returns
    -------
    torch.Tensor
        1-D ``float32`` tensor holding the flattened tensors of ``state`` with the
        keys in sorted order (independent of the dict's insertion order). Empty
        for an empty state.
    """
    if not state:
        return torch.empty(0, dtype=torch.float32)
    return torch.cat(
        [state[k].detach().reshape(-1).to(torch.float32) for k in sorted(state)]
    )


def unflatten(vec: torch.Tensor, like: AdapterState) -> AdapterState:
    """Inverse of :func:`flatten`.

    Parameters
    ----------
    vec : torch.Tensor
        1-D tensor with exactly as many elements as ``like`` holds in total.
    like : AdapterState
        Template giving keys, shapes, dtypes and devices of the result.

    Returns
    -------
    AdapterState
        New tensors (not views of ``vec``) with the shapes, dtypes and devices of
        ``like``, in ``like``'s key order; ``vec`` is read in sorted key order.

    Raises
    ------
    ValueError
        If ``vec`` is not 1-D or its length differs from the total size of
        ``like``.
    """
    if vec.dim() != 1:
        raise ValueError(
            f"unflatten: expected a 1-D vector, got shape {tuple(vec.shape)}"
        )
    total = sum(t.numel() for t in like.values())
    if vec.numel() != total:
        raise ValueError(
            f"unflatten: vector has {vec.numel()} elements but the template adapter "
            f"holds {total}"
        )
    out: AdapterState = {}
    offset = 0
    for k in sorted(like):
        ref = like[k]
        n = ref.numel()
        out[k] = (
            vec[offset : offset + n]
            .reshape(ref.shape)
            .to(device=ref.device, dtype=ref.dtype, copy=True)
        )
        offset += n
    return {k: out[k] for k in like}


def add(a: AdapterState, b: AdapterState) -> AdapterState:
    """Key-wise ``a + b``.

    Parameters
    ----------
    a, b : AdapterState
        Adapters with identical keys and shapes.

    Returns
    -------
    AdapterState
        New tensors, in ``a``'s key order.

    Raises
    ------
    ValueError
        If the key sets or shapes differ (the message names the keys).
    """
    _check_compatible(a, b, "add")
    return {k: a[k] + b[k] for k in a}


def sub(a: AdapterState, b: AdapterState) -> AdapterState:
    """Key-wise ``a - b``.

    Parameters
    ----------
    a, b : AdapterState
        Adapters with identical keys and shapes.

    Returns
    -------
    AdapterState
        New tensors, in ``a``'s key order.

    Raises
    ------
    ValueError
        If the key sets or shapes differ (the message names the keys).
    """
    _check_compatible(a, b, "sub")
    return {k: a[k] - b[k] for k in a}


def scale(a: AdapterState, x: float) -> AdapterState:
    """Key-wise ``x * a``.

    Parameters
    ----------
    a : AdapterState
        The adapter.
    x : float
        Scalar factor.

    Returns
    -------
    AdapterState
        New tensors, in ``a``'s key order.
    """
    return {k: v * x for k, v in a.items()}


def nbytes(state: AdapterState) -> int:
    """Memory held by the tensors of an adapter.

    Parameters
    ----------
    state : AdapterState
        The adapter.

    Returns
    -------
    int
        Sum of ``numel * element_size`` over all tensors.
    """
    return sum(t.numel() * t.element_size() for t in state.values())


def lora_pairs(state: AdapterState) -> dict[str, tuple[str, str]]:
    """Pair the ``lora_A`` / ``lora_B`` factors of each adapted module.

    Recognises ``<prefix>.lora_A.weight`` / ``<prefix>.lora_B.weight`` (linear
    layers) and peft's ``<prefix>.lora_embedding_A`` / ``lora_embedding_B``
    (embeddings; there too the update is built from ``B @ A``). Keys that are not
    LoRA factors (e.g. DoRA magnitudes, ``modules_to_save``) are ignored.

    Parameters
    ----------
    state : AdapterState
        The adapter (only its keys are used).

    Returns
    -------
    dict[str, tuple[str, str]]
        Module prefix -> ``(A key, B key)``, sorted by prefix.

    Raises
    ------
    ValueError
        If a ``lora_A`` key has no matching ``lora_B`` key or vice versa, or a
        module prefix has more than one pair.
    """
    pairs: dict[str, tuple[str, str]] = {}
    unpaired: list[str] = []
    for key in sorted(state):
        m = _LORA_RE.match(key)
        if m is None:
            continue
        prefix, emb, ab = m["prefix"], m["emb"] or "", m["ab"]
        suffix = m["suffix"] or ""
        a_key = f"{prefix}.lora_{emb}A{suffix}"
        b_key = f"{prefix}.lora_{emb}B{suffix}"
        partner = b_key if ab == "A" else a_key
        if partner not in state:
            unpaired.append(f"{key} (no {partner})")
            continue
        if prefix in pairs and pairs[prefix] != (a_key, b_key):
            raise ValueError(
                f"lora_pairs: module {prefix!r} has several LoRA pairs: "
                f"{pairs[prefix]} and {(a_key, b_key)}"
            )
        pairs[prefix] = (a_key, b_key)
    if unpaired:
        raise ValueError(f"lora_pairs: unpaired LoRA factors: {_few(unpaired)}")
    return dict(sorted(pairs.items()))


def validate_update(update: AdapterState, reference: AdapterState) -> None:
    """Check that a client update fits the reference adapter.

    Nothing is modified; all problems found are reported together.

    Parameters
    ----------
    update : AdapterState
        The adapter (or delta) a client sent.
    reference : AdapterState
        The adapter it must match in keys and shapes (e.g. the global adapter).

    Raises
    ------
    InvalidUpdateError
        If keys are missing or unexpected, a value is not a tensor, a tensor has
        a non-floating dtype or the wrong shape, or contains NaN/Inf. The message
        names the keys (a few of them when there are many), the shapes
        (got vs expected) and the number of non-finite entries.
    """
    if not isinstance(update, Mapping):
        raise InvalidUpdateError(
            f"invalid update: expected a dict of tensors, got {type(update).__name__}"
        )
    problems: list[str] = []
    ku, kr = set(update), set(reference)
    if kr - ku:
        problems.append(f"missing {len(kr - ku)} key(s): {_few(kr - ku)}")
    if ku - kr:
        problems.append(f"{len(ku - kr)} unexpected key(s): {_few(ku - kr)}")
    for k in sorted(ku & kr):
        v = update[k]
        if not isinstance(v, torch.Tensor):
            problems.append(f"{k!r}: not a tensor ({type(v).__name__})")
            continue
        if not v.is_floating_point():
            problems.append(f"{k!r}: non-floating dtype {v.dtype}")
            continue
        expected = tuple(reference[k].shape)
        if tuple(v.shape) != expected:
            problems.append(
                f"{k!r}: shape mismatch, got {tuple(v.shape)}, expected {expected}"
            )
            continue
        with torch.no_grad():
            n_nan = int(torch.isnan(v).sum().item())
            n_inf = int(torch.isinf(v).sum().item())
        if n_nan or n_inf:
            problems.append(f"{k!r}: {n_nan} NaN and {n_inf} Inf value(s)")
    if problems:
        shown = "; ".join(problems[: 2 * _FEW])
        more = len(problems) - 2 * _FEW
        tail = f"; ... ({more} more problems)" if more > 0 else ""
        raise InvalidUpdateError(
            f"invalid update ({len(problems)} problem(s)): {shown}{tail}"
        )


def rank_axis(key: str) -> int:
    """Return the axis that indexes LoRA ranks in tensor ``key``.

    Rows of ``lora_A`` (r x in), columns of ``lora_B`` (out x r).

    Raises
    ------
    ValueError
        ``key`` is neither a ``lora_A`` nor a ``lora_B`` tensor.
    """
    if "lora_A" in key:
        return 0
    if "lora_B" in key:
        return 1
    raise ValueError(f"{key} is not a lora_A / lora_B tensor: it has no ranks")


def neuron_axis(key: str) -> int:
    """Return the axis of LoRA tensor ``key`` that indexes its module's neurons.

    The other axis than :func:`rank_axis`: rows of ``lora_B`` (out x r: the
    module's outputs, e.g. the MLP neurons of ``gate_proj``/``up_proj``),
    columns of ``lora_A`` (r x in: its inputs, those of ``down_proj``).

    Raises
    ------
    ValueError
        ``key`` is neither a ``lora_A`` nor a ``lora_B`` tensor.
    """
    return 1 - rank_axis(key)


def check_ranks(
    ranks: object,
    shapes: Mapping[str, torch.Size],
    axis: Callable[[str], int] = rank_axis,
    what: str = "ranks",
) -> dict[str, list[int]]:
    """Validate a ``{tensor: [rank, ...]}`` selection against adapter shapes.

    Parameters
    ----------
    ranks : object
        The selection (e.g. a parsed JSON object).
    shapes : Mapping[str, torch.Size]
        The adapter's tensor shapes.
    axis : Callable[[str], int]
        The axis the indices select along (default: :func:`rank_axis`;
        :func:`neuron_axis` for neurons).
    what : str
        What the indices are, for error messages (default: ``"ranks"``).

    Returns
    -------
    dict[str, list[int]]
        The selection, each list sorted.

    Raises
    ------
    ValueError
        Not a mapping of known 2-D LoRA tensors to non-empty lists of distinct
        in-range integer ranks.
    """
    if not isinstance(ranks, Mapping):
        raise ValueError(f"{what} must map tensor names to index lists, got {ranks!r}")
    out: dict[str, list[int]] = {}
    for key, picked in ranks.items():
        if key not in shapes:
            raise ValueError(f"{what} name an unknown adapter tensor {key!r}")
        size = shapes[key][axis(str(key))]
        if (
            not isinstance(picked, list)
            or not picked
            or not all(type(i) is int and 0 <= i < size for i in picked)
            or len(set(picked)) != len(picked)
        ):
            raise ValueError(
                f"{what} of {key} must be distinct integers in [0, {size}), "
                f"got {picked!r}"
            )
        out[str(key)] = sorted(picked)
    return out


def take_ranks(tensor: torch.Tensor, key: str, ranks: list[int]) -> torch.Tensor:
    """Return the selected ranks of ``tensor`` (rows of A, columns of B)."""
    return tensor.index_select(rank_axis(key), torch.tensor(ranks))


def put_ranks(
    tensor: torch.Tensor, key: str, ranks: list[int], part: torch.Tensor
) -> torch.Tensor:
    """Return a copy of ``tensor`` with its selected ranks replaced by ``part``.

    Raises
    ------
    ValueError
        ``part`` does not have the shape of :func:`take_ranks`'s slice.
    """
    axis = rank_axis(key)
    want = list(tensor.shape)
    want[axis] = len(ranks)
    if list(part.shape) != want:
        raise ValueError(
            f"{key}: a slice of ranks {ranks} has shape {tuple(want)}, "
            f"got {tuple(part.shape)}"
        )
    return tensor.index_copy(axis, torch.tensor(ranks), part.to(tensor.dtype))
