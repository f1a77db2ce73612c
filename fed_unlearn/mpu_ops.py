"""MPU server pre- and post-processing for LoRA adapters (specs B.2 and B.8).

One MPU round, server side::

    secrets = draw_secrets(m)                                   # fresh, never sent
    copies, rnd = prepare_copies(theta, m, kappa, secrets)      # T_k(θ + ε_k)
    ... a local-update request (fed_unlearn.protocol) with the copies, one delta
    ... per copy back from the unlearning client ...
    delta = merge_returned(deltas, rnd, theta)                  # Σ_k Δ_k/α_k / Σ 1/α_k
    theta = add(theta, delta)

* Noise (:func:`zero_sum_noise`): ``ε_k = α_k·ε0_k`` with
  ``ε0_k = sqrt(m/(m−1))·(z_k − mean_k z_k)``, ``z_k ~ N(0, σ²)``, so
  ``Σ_k ε_k/α_k = 0`` and every ``ε0_k`` has marginal standard deviation σ.
  σ is ``κ·RMS`` of each tensor (``granularity="tensor"``, recommended for LoRA)
  or of all tensors of a transformer layer (``"layer"``, as the MPU code does).
* Gauge (:func:`draw_gauge`, :func:`apply_gauge`): per copy and LoRA module an
  ``r×r`` orthogonal ``Q`` with ``A' = Q A`` and ``B' = B Qᵀ``, so ``B'A' = BA``
  and the adapted model computes the same function. Deltas are mapped back with
  :func:`invert_gauge` (``ΔA = Qᵀ ΔA'``, ``ΔB = ΔB' Q``).
* Merge (:func:`harmonic_merge`): the ``1/α_k`` weights undo the copy scales,
  which cancels the noise to first order (exactly for a linear client map).

The gauge leaves ``B'A'`` visible: the noise, not the gauge, hides ``ΔW``. MPU is
obfuscation, not a formal privacy guarantee (spec B.7-4). Secrets must be drawn
fresh every round with ``seed=None``; explicit seeds are for tests only.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import secrets as _secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fed_unlearn.adapters import InvalidUpdateError, lora_pairs, validate_update
from fed_unlearn.aggregation import fedavg
from fed_unlearn.types import AdapterState

__all__ = [
    "ALPHA_SCHEDULES",
    "GAUGE_KINDS",
    "MPURound",
    "MPUSecrets",
    "apply_gauge",
    "draw_gauge",
    "draw_secrets",
    "harmonic_merge",
    "invert_gauge",
    "merge_returned",
    "prepare_copies",
    "zero_sum_noise",
]

ALPHA_SCHEDULES = ("random", "linear")
GAUGE_KINDS = ("orthogonal", "permutation", "none")
GRANULARITIES = ("tensor", "layer")

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ------------------------------------------------------------------------ secrets
@dataclass(frozen=True)
class MPUSecrets:
    """Per-round server secrets of MPU (never sent to a client).

    Parameters
    ----------
    alphas : tuple[float, ...]
        Copy scales ``α_k > 0``, one per copy (length ``m ≥ 2``).
    noise_seed : int
        Seed of the zero-sum noise.
    gauge_seed : int
        Seed of the gauge matrices.

    Notes
    -----
    All fields are hidden from ``repr`` so that logging a round does not leak
    them (the alphas plus the copies are enough to undo the noise, B.7-4).
    """

    alphas: tuple[float, ...] = field(repr=False)
    noise_seed: int = field(repr=False)
    gauge_seed: int = field(repr=False)

    def __post_init__(self) -> None:
        alphas = tuple(float(a) for a in self.alphas)
        if len(alphas) < 2:
            raise ValueError(f"MPU needs m >= 2 alphas, got {len(alphas)}")
        if not all(math.isfinite(a) and a > 0 for a in alphas):
            raise ValueError(f"alphas must be finite and > 0, got {alphas}")
        object.__setattr__(self, "alphas", alphas)

    @property
    def m(self) -> int:
        """Number of copies."""
        return len(self.alphas)


def _check_m(m: int) -> int:
    """Return ``m`` as an int, raising ``ValueError`` unless it is at least 2."""
    if isinstance(m, bool) or int(m) != m or int(m) < 2:
        raise ValueError(f"MPU needs m >= 2 copies, got {m!r}")
    return int(m)


def _alpha_schedule(
    m: int, schedule: str, uniform: Callable[[float, float], float]
) -> tuple[float, ...]:
    """Alphas of a schedule; ``uniform(a, b)`` draws the random ones."""
    if schedule == "linear":
        return tuple(1.0 + (k - 1) / (m - 1) for k in range(1, m + 1))
    if schedule == "random":
        return tuple(sorted(uniform(1.0, 3.0) for _ in range(m)))
    raise ValueError(
        f"unknown alpha schedule {schedule!r}; use one of {ALPHA_SCHEDULES}"
    )


def draw_secrets(
    m: int, alpha_schedule: str = "random", seed: int | None = None
) -> MPUSecrets:
    """Draw the secrets of one MPU round.

    Parameters
    ----------
    m : int
        Number of copies (``≥ 2``).
    alpha_schedule : str
        ``"random"``: sorted ``U[1, 3]`` draws (our recommendation, spec
        B.7-4, [R]); ``"linear"``: ``α_k = 1 + (k−1)/(m−1)`` (the paper's code,
        public, so it adds nothing to secrecy).
    seed : int or None
        ``None`` (deployment): seeds from ``secrets.randbits(64)`` and alphas
        from ``secrets.SystemRandom``. An int derives everything
        deterministically (tests and reproducible experiments only).

    Returns
    -------
    MPUSecrets
        Alphas and the noise / gauge seeds.

    Raises
    ------
    ValueError
        If ``m < 2`` or the schedule is unknown.
    """
    m = _check_m(m)
    if alpha_schedule not in ALPHA_SCHEDULES:
        raise ValueError(
            f"unknown alpha schedule {alpha_schedule!r}; use one of {ALPHA_SCHEDULES}"
        )
    if seed is None:
        rng = _secrets.SystemRandom()
        alphas = _alpha_schedule(m, alpha_schedule, rng.uniform)
        return MPUSecrets(alphas, _secrets.randbits(64), _secrets.randbits(64))
    det = random.Random(_hash_seed("mpu-secrets", int(seed)))
    alphas = _alpha_schedule(m, alpha_schedule, det.uniform)
    return MPUSecrets(alphas, det.getrandbits(64), det.getrandbits(64))


def _hash_seed(*parts: object) -> int:
    """Stable 64-bit seed from JSON-serialisable parts (SHA-256, first 16 hex)."""
    blob = json.dumps(list(parts), separators=(",", ":")).encode("utf-8")
    return int(hashlib.sha256(blob).hexdigest()[:16], 16)


def _generator(*parts: object) -> torch.Generator:
    """Return a CPU ``torch.Generator`` seeded from :func:`_hash_seed`."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_hash_seed(*parts))
    return gen


# -------------------------------------------------------------------------- noise
def _check_alphas(alphas: Sequence[float], m: int) -> list[float]:
    """Validate ``alphas`` against ``m`` copies."""
    out = [float(a) for a in alphas]
    if len(out) != m:
        raise ValueError(f"got {len(out)} alphas for m={m} copies")
    if not all(math.isfinite(a) and a > 0 for a in out):
        raise ValueError(f"alphas must be finite and > 0, got {out}")
    return out


def _check_state(state: AdapterState, what: str) -> None:
    """Raise ``ValueError`` unless ``state`` is a non-empty dict of finite floats."""
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{what} must be a non-empty dict of tensors")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise ValueError(f"{what}: {k!r} is not a floating-point tensor")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{what}: {k!r} contains NaN/Inf")


def _rms(tensors: Sequence[torch.Tensor]) -> float:
    """Root mean square over all entries of ``tensors`` (float64)."""
    total = sum(float(t.detach().double().pow(2).sum()) for t in tensors)
    count = sum(t.numel() for t in tensors)
    return math.sqrt(total / count) if count else 0.0


def _sigmas(adapter: AdapterState, kappa: float, granularity: str) -> dict[str, float]:
    """Noise standard deviation per tensor."""
    if granularity == "tensor":
        return {k: kappa * _rms([v]) for k, v in adapter.items()}
    if granularity != "layer":
        raise ValueError(
            f"unknown noise granularity {granularity!r}; use one of {GRANULARITIES}"
        )
    groups: dict[int, list[str]] = {}
    out: dict[str, float] = {}
    for k, v in adapter.items():
        match = _LAYER_RE.search(k)
        if match is None:
            out[k] = kappa * _rms([v])  # outside any layer: its own RMS
        else:
            groups.setdefault(int(match.group(1)), []).append(k)
    for keys in groups.values():
        sigma = kappa * _rms([adapter[k] for k in keys])
        out.update(dict.fromkeys(keys, sigma))
    return out


def zero_sum_noise(
    adapter: AdapterState,
    m: int,
    kappa: float,
    alphas: Sequence[float],
    seed: int,
    granularity: str = "tensor",
) -> list[AdapterState]:
    """Zero-sum, α-scaled Gaussian noise for ``m`` copies of an adapter.

    Parameters
    ----------
    adapter : AdapterState
        The clean adapter θ (only its shapes and RMS values are used).
    m : int
        Number of copies (``≥ 2``).
    kappa : float
        Relative noise scale ``κ ≥ 0``: ``σ = κ·RMS``.
    alphas : Sequence[float]
        Copy scales ``α_k > 0`` (length ``m``).
    seed : int
        Secret noise seed; tensor ``n`` of copy ``k`` draws ``z`` from a
        generator seeded with ``sha256(json([seed, "noise", n, k]))``.
    granularity : str
        ``"tensor"``: ``σ_n = κ·RMS(tensor n)``; ``"layer"``: one σ per
        transformer layer over all tensors whose key contains ``layers.{l}.``
        (tensors outside any layer use their own RMS).

    Returns
    -------
    list[AdapterState]
        ``ε_k`` for ``k = 0..m−1`` (fp32, on the adapter's devices), with
        ``Σ_k ε_k/α_k = 0`` up to rounding. A tensor of zeros (e.g. ``B`` at
        initialisation) gets zero noise under ``"tensor"``.

    Raises
    ------
    ValueError
        If ``m < 2``, ``kappa`` is negative or not finite, ``alphas`` has the
        wrong length or non-positive entries, the granularity is unknown, or
        the adapter is empty or not finite.
    """
    m = _check_m(m)
    kappa = float(kappa)
    if not math.isfinite(kappa) or kappa < 0:
        raise ValueError(f"kappa must be a finite number >= 0, got {kappa}")
    al = _check_alphas(alphas, m)
    _check_state(adapter, "adapter")
    sigmas = _sigmas(adapter, kappa, granularity)
    factor = math.sqrt(m / (m - 1))
    out: list[AdapterState] = [{} for _ in range(m)]
    for name, ref in adapter.items():
        z = torch.stack(
            [
                torch.randn(
                    ref.shape,
                    generator=_generator(int(seed), "noise", name, k),
                    dtype=torch.float32,
                )
                for k in range(m)
            ]
        )
        eps0 = (z - z.mean(dim=0, keepdim=True)) * (factor * sigmas[name])
        for k in range(m):
            out[k][name] = (eps0[k] * al[k]).to(ref.device)
    return out


# -------------------------------------------------------------------------- gauge
def _rank_of(state: AdapterState, a_key: str, b_key: str) -> int:
    """LoRA rank of a pair, checking that ``A`` is ``[r, ·]`` and ``B`` ``[·, r]``."""
    a, b = state[a_key], state[b_key]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(
            f"LoRA pair {a_key!r} {tuple(a.shape)} / {b_key!r} {tuple(b.shape)} is "
            "not [r, in] / [out, r]"
        )
    return int(a.shape[0])


def _haar_orthogonal(x: torch.Tensor) -> torch.Tensor:
    """Map Gaussian ``[..., r, r]`` matrices to Haar-distributed orthogonal ones.

    ``x = QR`` (batched QR), then ``Q·diag(sign(diag(R)))``: the orthogonal
    factor of the QR decomposition whose ``R`` has a positive diagonal, which
    makes the distribution exactly Haar (without the fix it depends on the QR
    routine's sign convention).
    """
    q, rr = torch.linalg.qr(x)
    signs = torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1))
    signs[signs == 0] = 1.0
    return q * signs.unsqueeze(-2)


def draw_gauge(
    adapter: AdapterState, m: int, seed: int, kind: str = "orthogonal"
) -> list[dict[str, torch.Tensor]]:
    """Draw one rank-space gauge per copy and LoRA module.

    Parameters
    ----------
    adapter : AdapterState
        The adapter (keys and shapes give the modules and ranks).
    m : int
        Number of copies (``≥ 2``).
    seed : int
        Secret gauge seed; module ``p`` of copy ``k`` uses a generator seeded
        with ``sha256(json([seed, "gauge", p, k]))``.
    kind : str
        ``"orthogonal"`` (Haar, QR of a Gaussian with the sign fix),
        ``"permutation"`` (a random permutation matrix; also Adam-equivariant)
        or ``"none"`` (identity).

    Returns
    -------
    list[dict[str, torch.Tensor]]
        Per copy: module prefix (as in :func:`~fed_unlearn.adapters.lora_pairs`)
        -> ``r×r`` float64 matrix ``Q``.

    Raises
    ------
    ValueError
        If ``m < 2``, ``kind`` is unknown, a LoRA pair is unpaired or its
        shapes do not fit.
    """
    m = _check_m(m)
    if kind not in GAUGE_KINDS:
        raise ValueError(f"unknown gauge kind {kind!r}; use one of {GAUGE_KINDS}")
    ranks = {p: _rank_of(adapter, a, b) for p, (a, b) in lora_pairs(adapter).items()}
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(m)]
    if kind == "orthogonal":
        # one Gaussian per (copy, module) from its own seed; one batched QR per rank
        by_rank: dict[int, list[tuple[int, str]]] = {}
        for k in range(m):
            for prefix, r in ranks.items():
                by_rank.setdefault(r, []).append((k, prefix))
        for r, items in by_rank.items():
            x = torch.stack(
                [
                    torch.randn(
                        r,
                        r,
                        generator=_generator(int(seed), "gauge", prefix, k),
                        dtype=torch.float64,
                    )
                    for k, prefix in items
                ]
            )
            for (k, prefix), q in zip(items, _haar_orthogonal(x), strict=True):
                out[k][prefix] = q
        return [{p: qs[p] for p in ranks} for qs in out]
    for k in range(m):
        for prefix, r in ranks.items():
            eye = torch.eye(r, dtype=torch.float64)
            if kind == "none":
                out[k][prefix] = eye
            else:
                gen = _generator(int(seed), "gauge", prefix, k)
                out[k][prefix] = eye[torch.randperm(r, generator=gen)]
    return out


def _transform(
    state: AdapterState, gauge: Mapping[str, torch.Tensor], inverse: bool
) -> AdapterState:
    """Shared body of :func:`apply_gauge` and :func:`invert_gauge`."""
    pairs = lora_pairs(state)
    if set(pairs) != set(gauge):
        missing = sorted(set(pairs) - set(gauge))[:3]
        extra = sorted(set(gauge) - set(pairs))[:3]
        raise ValueError(
            f"gauge does not fit the adapter's LoRA modules (no Q for {missing}; "
            f"Q for unknown modules {extra})"
        )
    out: AdapterState = {k: v.clone() for k, v in state.items()}
    for prefix, (a_key, b_key) in pairs.items():
        r = _rank_of(state, a_key, b_key)
        q = gauge[prefix]
        if tuple(q.shape) != (r, r):
            raise ValueError(
                f"gauge for {prefix!r} has shape {tuple(q.shape)}, expected ({r}, {r})"
            )
        a, b = state[a_key], state[b_key]
        q = q.to(device=a.device, dtype=torch.float64)
        a64, b64 = a.double(), b.to(a.device).double()
        if inverse:  # ΔA = Qᵀ ΔA',  ΔB = ΔB' Q
            new_a, new_b = q.T @ a64, b64 @ q
        else:  # A' = Q A,  B' = B Qᵀ
            new_a, new_b = q @ a64, b64 @ q.T
        out[a_key] = new_a.to(dtype=a.dtype)
        out[b_key] = new_b.to(device=b.device, dtype=b.dtype)
    return out


def apply_gauge(state: AdapterState, Q: Mapping[str, torch.Tensor]) -> AdapterState:
    """Reparameterise an adapter: ``A' = Q A``, ``B' = B Qᵀ`` for every pair.

    Parameters
    ----------
    state : AdapterState
        The adapter (or a delta).
    Q : Mapping[str, torch.Tensor]
        Module prefix -> ``r×r`` matrix (one copy of :func:`draw_gauge`).

    Returns
    -------
    AdapterState
        New tensors in the input dtypes (computed in float64); non-LoRA keys
        are copied unchanged. For orthogonal ``Q`` the adapted model's output
        is unchanged (``B'A' = BA``).

    Raises
    ------
    ValueError
        If the gauge's modules differ from the adapter's or a ``Q`` has the
        wrong shape.
    """
    return _transform(state, Q, inverse=False)


def invert_gauge(delta: AdapterState, Q: Mapping[str, torch.Tensor]) -> AdapterState:
    """Map a delta from gauge coordinates back: ``ΔA = Qᵀ ΔA'``, ``ΔB = ΔB' Q``.

    Parameters
    ----------
    delta : AdapterState
        Delta (or adapter) in the coordinates of :func:`apply_gauge` with ``Q``.
    Q : Mapping[str, torch.Tensor]
        The same gauge that produced those coordinates.

    Returns
    -------
    AdapterState
        New tensors in the original coordinates; non-LoRA keys unchanged.

    Raises
    ------
    ValueError
        As :func:`apply_gauge`.
    """
    return _transform(delta, Q, inverse=True)


# -------------------------------------------------------------------------- merge
def harmonic_merge(
    deltas: Sequence[AdapterState], alphas: Sequence[float]
) -> AdapterState:
    """Harmonic denoising aggregation ``Σ_k Δ_k/α_k / Σ_k 1/α_k``.

    Parameters
    ----------
    deltas : Sequence[AdapterState]
        One delta per copy, in original coordinates, with identical keys and
        shapes.
    alphas : Sequence[float]
        The copies' scales ``α_k > 0``.

    Returns
    -------
    AdapterState
        The merged delta, in the first delta's key order and dtypes
        (accumulated in float64).

    Raises
    ------
    ValueError
        If the counts differ, there are fewer than 2 deltas, alphas are not
        positive, or keys/shapes differ between deltas.
    """
    m = _check_m(len(deltas))
    al = _check_alphas(alphas, m)
    ref = deltas[0]
    for i, d in enumerate(deltas[1:], start=1):
        if set(d) != set(ref):
            missing = sorted(set(ref) - set(d))[:3]
            extra = sorted(set(d) - set(ref))[:3]
            raise ValueError(
                f"delta {i} keys differ from delta 0 (missing {missing}, "
                f"unexpected {extra})"
            )
        for key, t in ref.items():
            if d[key].shape != t.shape:
                raise ValueError(
                    f"delta {i}: {key!r} has shape {tuple(d[key].shape)}, delta 0 "
                    f"has {tuple(t.shape)}"
                )
    # FedAvg's weighted mean (float64 accumulation) with weights 1/α_k
    return fedavg(list(deltas), [1.0 / a for a in al])


# -------------------------------------------------------------------------- round
@dataclass
class MPURound:
    """Server-side state of one MPU round (opaque to clients; never sent).

    ``repr`` hides the alphas and gauges.

    Parameters
    ----------
    m : int
        Number of copies.
    alphas : tuple[float, ...]
        Copy scales.
    gauges : list[dict[str, torch.Tensor]]
        Per copy, module prefix -> ``Q`` (from :func:`draw_gauge`).
    kappa : float
        Noise scale used.
    granularity : str
        Noise granularity used.
    gauge_kind : str
        Gauge kind used.
    """

    m: int
    alphas: tuple[float, ...] = field(repr=False)
    gauges: list[dict[str, torch.Tensor]] = field(repr=False)
    kappa: float
    granularity: str
    gauge_kind: str


def prepare_copies(
    theta: AdapterState,
    m: int,
    kappa: float,
    secrets: MPUSecrets,
    granularity: str = "tensor",
    gauge: str = "orthogonal",
) -> tuple[list[AdapterState], MPURound]:
    """MPU pre-processing: the ``m`` perturbed, reparameterised copies.

    Parameters
    ----------
    theta : AdapterState
        The clean global adapter (fp32 recommended, spec B.7-5).
    m : int
        Number of copies (must equal ``len(secrets.alphas)``).
    kappa : float
        Relative noise scale ``κ ≥ 0``.
    secrets : MPUSecrets
        This round's secrets (:func:`draw_secrets`).
    granularity : str
        Noise granularity, ``"tensor"`` or ``"layer"`` (:func:`zero_sum_noise`).
    gauge : str
        Gauge kind, ``"orthogonal"``, ``"permutation"`` or ``"none"``.

    Returns
    -------
    tuple[list[AdapterState], MPURound]
        The copies ``T_k(θ + ε_k)`` (``theta``'s keys, shapes and dtypes) and
        the round state needed by :func:`merge_returned`.

    Raises
    ------
    ValueError
        On ``m < 2``, ``m`` not matching the secrets, ``kappa < 0``, unknown
        options or a non-finite / empty ``theta``.
    """
    m = _check_m(m)
    if secrets.m != m:
        raise ValueError(f"m={m} but the secrets hold {secrets.m} alphas")
    noise = zero_sum_noise(
        theta, m, kappa, secrets.alphas, secrets.noise_seed, granularity
    )
    gauges = draw_gauge(theta, m, secrets.gauge_seed, gauge)
    copies = []
    for k in range(m):
        noisy = {
            key: (v.float() + noise[k][key]).to(v.dtype) for key, v in theta.items()
        }
        copies.append(apply_gauge(noisy, gauges[k]))
    rnd = MPURound(
        m=m,
        alphas=tuple(secrets.alphas),
        gauges=gauges,
        kappa=float(kappa),
        granularity=granularity,
        gauge_kind=gauge,
    )
    return copies, rnd


def merge_returned(
    returned: Sequence[AdapterState], rnd: MPURound, reference: AdapterState
) -> AdapterState:
    """MPU post-processing: validate, un-gauge and harmonic-merge client deltas.

    Parameters
    ----------
    returned : Sequence[AdapterState]
        The client's deltas ``Δ'_k = θ̃_k^after − θ̃_k``, in copy order.
    rnd : MPURound
        The round state from :func:`prepare_copies`.
    reference : AdapterState
        An adapter with the expected keys and shapes (e.g. the clean θ).

    Returns
    -------
    AdapterState
        The merged delta ``Σ_k T_k⁻¹(Δ'_k)/α_k / Σ_k 1/α_k`` in the original
        coordinates; apply as ``θ ← θ + η_srv·Δ̄``.

    Raises
    ------
    ValueError
        If the number of deltas is not ``rnd.m``, or a delta has missing or
        unexpected keys, wrong shapes, a non-float dtype or NaN/Inf (an
        :class:`~fed_unlearn.adapters.InvalidUpdateError` whose message starts
        with ``copy k:`` and names the offending keys).
    """
    if isinstance(returned, Mapping) or not isinstance(returned, Sequence):
        raise ValueError(
            f"expected a list of {rnd.m} deltas, got {type(returned).__name__}"
        )
    if len(returned) != rnd.m:
        raise ValueError(f"expected {rnd.m} returned deltas, got {len(returned)}")
    for k, delta in enumerate(returned):
        try:
            validate_update(delta, reference)
        except InvalidUpdateError as exc:
            raise InvalidUpdateError(f"copy {k}: {exc}") from None
    back = [invert_gauge(d, rnd.gauges[k]) for k, d in enumerate(returned)]
    merged = harmonic_merge(back, rnd.alphas)
    return {key: merged[key].to(reference[key].dtype) for key in reference}
