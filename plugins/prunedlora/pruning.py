"""The pruning math of PrunedLoRA, batched over modules of the same shape (pure functions, no modules).

Layout: every LoRA factor is handled as a stack of matrices whose *columns* are the rank components:
``B`` as is, ``(M, d_out, r)``; ``A`` transposed, ``(M, d_in, r)``. ``M`` modules of the same shape and rank
are pruned together, so an event costs a few batched matmuls and one batched ``r × r`` Cholesky per factor.

Second-order model of the training loss around the current factor ``W`` (gradient ``G``), with the
curvature ``H = Gᵀ G`` in rank space (empirical Fisher of the step; a running average is an option)::

    L(W + Δ) − L(W) ≈ ⟨G, Δ⟩ + ½ tr(Δ H Δᵀ)

Removing component ``j`` is the constraint ``(W + Δ) e_j = 0``. The Lagrangian gives the minimiser
(optimal brain surgeon with the first-order term; H⁻¹ symmetric, ``h_j`` its row j)::

    Δ* = −G H⁻¹ − r_j h_jᵀ / (H⁻¹)_jj,        r_j = w_j − (G H⁻¹)_{:,j}
    L(W + Δ*) − L(W) ≈ −½ tr(G H⁻¹ Gᵀ) + ½ ‖r_j‖² / (H⁻¹)_jj

The first term does not depend on ``j``, so ``S_j = ½ ‖r_j‖² / (H⁻¹)_jj`` ranks the components (summed
over the B and A factors). ``Δ*`` splits into a Newton step that leaves column ``j`` alone,
``−G H⁻¹ + (G H⁻¹)_{:,j} h_jᵀ / (H⁻¹)_jj``, and the OBS compensation ``−w_j h_jᵀ / (H⁻¹)_jj`` that
moves the removed column onto the survivors. The Newton part scales like 1/‖G‖ (H is quadratic in G), so
``recovery="compensation"`` applies only the second part.

Each factor's model treats the other factor as fixed, so the B-side and the A-side compensation each replace
the removed product ``b_j a_jᵀ`` on their own; ``factor_weights`` scales them (``(½, ½)`` compensates once).
"""

from __future__ import annotations

from typing import Literal

import torch

Recovery = Literal["full", "compensation", "none"]

#: floor of the damping; matters only for an all-zero gradient (B = 0 makes ∂L/∂A vanish)
_TINY = 1e-30


def rank_curvature(grad: torch.Tensor) -> torch.Tensor:
    """``Gᵀ G`` per module in float64: ``(M, n, r) -> (M, r, r)``."""
    g = grad.float()
    return (g.transpose(1, 2) @ g).double()


def damped(curvature: torch.Tensor, active: torch.Tensor, damping: float) -> torch.Tensor:
    """``H`` restricted to the active components, damped by ``damping · mean(diag H)`` on that block, with
    the removed components decoupled (identity), so its inverse is the inverse of the active block."""
    m = active.to(curvature.dtype)
    h = curvature * m[:, :, None] * m[:, None, :]
    mean_diag = h.diagonal(dim1=1, dim2=2).sum(-1) / m.sum(-1).clamp_min(1)
    shift = damping * mean_diag + _TINY
    return h + torch.diag_embed(shift[:, None] * m + (1 - m))


def spd_inverse(h: torch.Tensor) -> torch.Tensor:
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def gradient_scores(weight: torch.Tensor, grad: torch.Tensor, h_inv: torch.Tensor):
    """``S_j = ½‖w_j − (G H⁻¹)_{:,j}‖² / (H⁻¹)_jj`` per component; also returns ``G H⁻¹`` and the residuals."""
    newton = grad @ h_inv
    residual = weight - newton
    scores = 0.5 * residual.square().sum(1) / h_inv.diagonal(dim1=1, dim2=2)
    return scores, newton, residual


def activation_scores(b: torch.Tensor, input_energy: torch.Tensor) -> torch.Tensor:
    """Wanda-like ``‖X a_jᵀ‖ · ‖b_j‖`` from the accumulated ``Σ_x (a_j · x)²`` (``b`` as ``(M, d_out, r)``)."""
    return input_energy.clamp_min(0).sqrt() * b.norm(dim=1)


def taylor_scores(b, grad_b, a_t, grad_a_t) -> torch.Tensor:
    """First-order Taylor ``Σ |g · w|`` over the entries of the component (LLM-Pruner's element1)."""
    return (grad_b * b).abs().sum(1) + (grad_a_t * a_t).abs().sum(1)


@torch.no_grad()
def prune_components(factors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], k: int,
                     fixed_scores: torch.Tensor | None = None, recovery: Recovery = "full",
                     damping: float = 1e-2, factor_weights: tuple[float, ...] | None = None) -> torch.Tensor:
    """Remove ``k`` rank components from every module of a stack, one at a time, updating the factors.

    ``factors``: ``(weight, grad, curvature)`` per factor (B and Aᵀ), weight and grad ``(M, n, r)`` float32,
    curvature ``(M, r, r)`` float64 (undamped). ``weight`` is updated in place: removed columns become zero
    and, with recovery, the survivors receive the update of the module docstring. Between removals the
    gradient follows the quadratic model (``G ← G + Δ H``) and ``H⁻¹`` is recomputed on the survivors.
    ``fixed_scores`` (``(M, r)``) replaces the gradient score (activation/Taylor ablations); the recovery
    still uses the curvature. ``factor_weights`` scales each factor's update (default 1 each). Returns the removed component indices, ``(M, k)``, in removal order.
    """
    weight0 = factors[0][0]
    num_modules, rank = weight0.shape[0], weight0.shape[-1]
    if not 0 < k < rank:
        raise ValueError(f"can remove 1..{rank - 1} of {rank} components per module, asked for {k}")
    rows = torch.arange(num_modules, device=weight0.device)
    active = torch.ones(num_modules, rank, dtype=torch.bool, device=weight0.device)
    grads = [g.clone() for _, g, _ in factors]
    need_curvature = fixed_scores is None or recovery != "none"
    removed = []
    for _ in range(k):
        total = torch.zeros(num_modules, rank, dtype=torch.float64, device=weight0.device)
        steps = []
        for (weight, _, curvature), grad in zip(factors, grads):
            if not need_curvature:
                break
            h = damped(curvature, active, damping)
            h_inv = spd_inverse(h)
            scores, newton, residual = gradient_scores(weight, grad, h_inv.to(weight.dtype))
            total += scores
            steps.append((h, h_inv.to(weight.dtype), newton, residual))
        scores = total if fixed_scores is None else fixed_scores.double()
        j = scores.masked_fill(~active, torch.inf).argmin(-1)
        for i, ((weight, _, _), grad) in enumerate(zip(factors, grads)):
            if recovery != "none":
                h, h_inv, newton, residual = steps[i]
                h_j = h_inv[rows, j]  # (M, r): row j of H⁻¹ (zero on removed components)
                d_j = h_inv[rows, j, j][:, None, None]
                moved = residual[rows, :, j] if recovery == "full" else weight[rows, :, j]
                delta = -moved[:, :, None] * h_j[:, None, :] / d_j
                if recovery == "full":
                    delta -= newton
                if factor_weights is not None:
                    delta *= factor_weights[i]
                weight += delta
                grad += delta @ h.to(weight.dtype)
            weight[rows, :, j] = 0
            grad[rows, :, j] = 0
        active[rows, j] = False
        removed.append(j)
    return torch.stack(removed, dim=1)


def keep_indices(removed: torch.Tensor, rank: int) -> torch.Tensor:
    """The surviving component indices per module, in their original order: ``(M, k) -> (M, rank - k)``."""
    keep = torch.ones(removed.shape[0], rank, dtype=torch.bool, device=removed.device)
    keep[torch.arange(removed.shape[0], device=removed.device)[:, None], removed] = False
    return keep.nonzero()[:, 1].view(removed.shape[0], rank - removed.shape[1])
