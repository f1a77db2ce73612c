r"""Orthogonal-subspace bookkeeping of continual unlearning (``ortho_lora``).

Pure torch (specs/methods.md §1.3). For every adapted linear layer with update
ΔW_t ∈ R^{d_out×d_in} of request t, the server keeps an orthonormal basis
U_{<t} ∈ R^{d_out×K} of the output (column) space the earlier requests used:

- :func:`energy_rank`: the smallest k with Σ_{i≤k} σ_i² ≥ ε·Σ_i σ_i² [R];
- :func:`extend_basis`: SVD of ΔW_t, keep those k left singular vectors, append
  them to U_{<t} and re-orthonormalise (QR) [R];
- :func:`check_capacity`: Σ_t k_t ≤ d_out; a request into a full layer raises
  :class:`CapacityError` naming it [R];
- :func:`project_out`: B ← (I − U Uᵀ) B [R];
- :func:`Projector`: the client's hook that re-projects the *change* of each
  projected parameter after every optimiser step (Adam's update is not linear
  in the gradient, so the parameters, not the gradients, are projected) [R].
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fed_unlearn import adapters as ad
from fed_unlearn.types import AdapterState

__all__ = [
    "CapacityError",
    "Projector",
    "check_capacity",
    "energy_rank",
    "extend_basis",
    "lora_products",
    "project_out",
]

#: Singular values below this share of the largest count as zero (a ΔW of rank
#: below r, or an exact zero update).
RANK_TOL = 1e-6


class CapacityError(ValueError):
    """A layer's output space is used up by earlier requests (names the layer)."""


def energy_rank(sigma: torch.Tensor, eps: float) -> int:
    """Return the smallest k whose top singular values hold ``eps`` of the energy.

    Parameters
    ----------
    sigma : torch.Tensor
        Singular values, descending (1-D).
    eps : float
        Energy share in (0, 1].

    Returns
    -------
    int
        The smallest k with Σ_{i≤k} σ_i² ≥ ε Σ_i σ_i²; 0 for an all-zero
        spectrum.

    Raises
    ------
    ValueError
        ``eps`` outside (0, 1] or ``sigma`` not 1-D.
    """
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"energy threshold eps must be in (0, 1], got {eps}")
    if sigma.dim() != 1:
        raise ValueError(f"sigma must be 1-D, got shape {tuple(sigma.shape)}")
    s = sigma.double()
    if s.numel() == 0 or float(s.max()) <= 0.0:
        return 0
    s = torch.where(s > RANK_TOL * s.max(), s, torch.zeros_like(s))
    energy = (s**2).cumsum(0)
    total = float(energy[-1])
    # tolerance: an energy share of exactly eps (eps = 1 on a rank-k matrix)
    k = int((energy < eps * total * (1 - 1e-12)).sum()) + 1
    return min(k, int((s > 0).sum()))


def project_out(m: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Return (I − U Uᵀ) M: M without its component in span(U).

    Parameters
    ----------
    m : torch.Tensor
        Matrix with ``d_out`` rows (a ``lora_B`` factor or a change of it).
    basis : torch.Tensor, optional
        Orthonormal columns U (``d_out × K``); ``None`` or K = 0: M unchanged.

    Returns
    -------
    torch.Tensor
        The projected matrix (a new tensor, M's dtype).
    """
    if basis is None or basis.shape[1] == 0:
        return m.clone()
    u = basis.to(torch.float64)
    x = m.to(torch.float64)
    return (x - u @ (u.T @ x)).to(m.dtype)


def extend_basis(
    basis: torch.Tensor | None, dw: torch.Tensor, eps: float
) -> tuple[torch.Tensor, int]:
    """Append the energy-ε column space of ``dw`` to ``basis`` (QR-orthonormal).

    The new directions are taken from the part of ΔW outside span(U) (for a
    projected request that is all of it), so the result stays orthonormal even
    for an unconstrained ΔW.

    Parameters
    ----------
    basis : torch.Tensor, optional
        U_{<t} (``d_out × K``, orthonormal), or ``None`` before any request.
    dw : torch.Tensor
        ΔW_t (``d_out × d_in``).
    eps : float
        Energy threshold of :func:`energy_rank`.

    Returns
    -------
    tuple[torch.Tensor, int]
        U_{≤t} (``d_out × (K + k)``, float32) and k. The new directions lie
        outside span(U), so K + k ≤ d_out always holds;
        :func:`check_capacity` refuses a request into a full layer.
    """
    d_out = dw.shape[0]
    resid = project_out(dw.to(torch.float64), basis)
    u, s, _ = torch.linalg.svd(resid, full_matrices=False)
    k = energy_rank(s, eps)
    parts = [u[:, :k]] if basis is None else [basis.to(torch.float64), u[:, :k]]
    stacked = torch.cat(parts, dim=1)
    if stacked.shape[1] == 0:
        return torch.zeros(d_out, 0), 0
    q, _ = torch.linalg.qr(stacked)
    return q.to(torch.float32), k


def check_capacity(basis: torch.Tensor | None, d_out: int, layer: str) -> None:
    """Raise if a layer's output space has no direction left for a new request.

    Parameters
    ----------
    basis : torch.Tensor, optional
        U_{<t} of the layer (``d_out × K``).
    d_out : int
        The layer's output dimension.
    layer : str
        Its name, for the message.

    Raises
    ------
    CapacityError
        K = Σ_{s<t} k_s ≥ d_out, naming the layer and its numbers.
    """
    used = 0 if basis is None else basis.shape[1]
    if used >= d_out:
        raise CapacityError(
            f"ortho_lora: layer {layer!r} is exhausted: earlier requests use "
            f"{used} of its {d_out} output directions, so a new request cannot "
            "change it; lower eps, or restart the sequence from the retrain oracle"
        )


def lora_products(state: AdapterState) -> dict[str, tuple[str, torch.Tensor]]:
    """Return ``B @ A`` of every LoRA pair (the update up to the scaling s).

    Parameters
    ----------
    state : AdapterState
        An adapter.

    Returns
    -------
    dict[str, tuple[str, torch.Tensor]]
        Module prefix -> (its ``lora_B`` key, ``B @ A`` in float64).
    """
    out = {}
    for prefix, (a_key, b_key) in ad.lora_pairs(state).items():
        out[prefix] = (b_key, state[b_key].double() @ state[a_key].double())
    return out


class Projector:
    """Keep each parameter's change since the start in the complement of its basis.

    Call the instance after every optimiser step: for each projected parameter
    p with start value p₀ and basis U, p ← p₀ + (I − U Uᵀ)(p − p₀).

    Parameters
    ----------
    params : Mapping[str, torch.nn.Parameter]
        Name -> parameter (e.g. the model's ``lora_B`` factors).
    bases : Mapping[str, torch.Tensor]
        Name -> orthonormal basis (rows = the parameter's rows); every name
        must be a key of ``params``.

    Raises
    ------
    ValueError
        A basis names no parameter, or its row count differs from the
        parameter's.
    """

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter],
        bases: Mapping[str, torch.Tensor],
    ) -> None:
        unknown = sorted(set(bases) - set(params))
        if unknown:
            raise ValueError(f"projection bases of unknown tensors: {unknown[:3]}")
        self._items = []
        for name, u in bases.items():
            p = params[name]
            if u.dim() != 2 or u.shape[0] != p.shape[0]:
                raise ValueError(
                    f"basis of {name} has shape {tuple(u.shape)}; it needs "
                    f"{p.shape[0]} rows (the tensor is {tuple(p.shape)})"
                )
            basis = u.to(device=p.device, dtype=torch.float32)
            self._items.append((p, p.detach().clone(), basis))

    def __call__(self, *_args: object) -> None:
        """Project every parameter's change (the ``on_step`` signature)."""
        with torch.no_grad():
            for p, start, u in self._items:
                change = p.data.float() - start.float()
                p.data.sub_((u @ (u.T @ change)).to(p.dtype))
