"""Batched, exact non-negative least squares of token features against a concept bank.

For every token feature `a` (length D) and a bank `C` (k, D) we solve
``min_w ||a - w C||^2  subject to  w >= 0``. All tokens share the Gram matrix
``G = C C^T``, so the problem is solved in normal-equation form with a batched block
principal pivoting method (an active-set method that exchanges many variables per step,
with a single-variable backup rule that guarantees termination). Each step solves the
unconstrained problem on every token's passive set at once with one batched linear solve,
on whatever device the features are on, in float64. The result is exact up to rounding, not
an iterative approximation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# relative tolerance on the optimality (KKT) conditions, scaled by each token's magnitude
KKT_TOLERANCE = 1e-10
# a ridge this small (relative to the Gram diagonal) only matters for duplicate concepts
RIDGE = 1e-12
# tokens solved per batched solve: chunk * k * k float64 numbers stay below this many
MAX_SOLVE_ELEMENTS = 1 << 23
# backup rule: full exchanges allowed without progress before exchanging one variable
FULL_EXCHANGE_TRIES = 3


def _systems(gram: "torch.Tensor", passive: "torch.Tensor") -> "torch.Tensor":
    """G restricted to each row's passive set, with the identity on the rest (SPD, (n, k, k))."""
    import torch

    k = gram.shape[0]
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    ridge = RIDGE * gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    mask = passive.to(gram.dtype)
    return gram * (mask[:, :, None] * mask[:, None, :]) + eye * (1.0 - mask + ridge * mask)[:, :, None]


def _solve_passive(gram: "torch.Tensor", rhs: "torch.Tensor", passive: "torch.Tensor") -> "torch.Tensor":
    """Solve G_FF x_F = b_F per row for each row's passive set F (x is zero outside F).

    Rows sharing a passive set share one Cholesky factor, so the cost is one factorisation
    per distinct set plus a triangular solve per row.
    """
    import torch

    n, k = rhs.shape
    masked = rhs * passive.to(rhs.dtype)
    out = torch.empty_like(rhs)
    chunk = max(1, MAX_SOLVE_ELEMENTS // (k * k))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        patterns, inverse = torch.unique(passive[start:stop], dim=0, return_inverse=True)
        factors = torch.linalg.cholesky(_systems(gram, patterns))
        out[start:stop] = torch.cholesky_solve(masked[start:stop, :, None], factors[inverse])[:, :, 0]
    return out


def solve_normal(gram: "torch.Tensor", rhs: "torch.Tensor", max_iterations: int | None = None) -> "torch.Tensor":
    """Solve ``min_w 0.5 w^T G w - b^T w, w >= 0`` for each row b of `rhs` (N, k); returns (N, k)."""
    import torch

    n, k = rhs.shape
    limit = max_iterations if max_iterations is not None else 20 * k + 50
    # start from the sign pattern of the unconstrained solution: usually few exchanges remain
    passive = torch.linalg.solve(_systems(gram, torch.ones(1, k, dtype=torch.bool, device=rhs.device))[0], rhs.T).T > 0
    x = _solve_passive(gram, rhs, passive)
    y = torch.where(passive, torch.zeros_like(rhs), x @ gram - rhs)
    scale = rhs.abs().amax(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
    tol_y = (KKT_TOLERANCE * scale)[:, None]
    tol_x = (KKT_TOLERANCE * scale / gram.diagonal().amax().clamp_min(torch.finfo(rhs.dtype).tiny))[:, None]
    best = torch.full((n,), k + 1, dtype=torch.long, device=rhs.device)
    tries = torch.full((n,), FULL_EXCHANGE_TRIES, dtype=torch.long, device=rhs.device)
    active = torch.arange(n, device=rhs.device)
    positions = torch.arange(k, device=rhs.device)
    for _ in range(limit):
        p, xa, ya = passive[active], x[active], y[active]
        infeasible = (p & (xa < -tol_x[active])) | (~p & (ya < -tol_y[active]))
        count = infeasible.sum(dim=1)
        keep = count > 0
        if not bool(keep.any()):
            active = active[:0]
            break
        active, p, infeasible, count = active[keep], p[keep], infeasible[keep], count[keep]
        improved = count < best[active]
        allowed = improved | (tries[active] >= 1)
        best[active] = torch.where(improved, count, best[active])
        tries[active] = torch.where(improved, FULL_EXCHANGE_TRIES, torch.where(allowed, tries[active] - 1, tries[active]))
        last = torch.where(infeasible, positions, -1).amax(dim=1)
        single = positions[None, :] == last[:, None]
        swap = torch.where(allowed[:, None], infeasible, single)
        p = p ^ swap
        passive[active] = p
        xs = _solve_passive(gram, rhs[active], p)
        ys = xs @ gram - rhs[active]
        x[active] = xs
        y[active] = torch.where(p, torch.zeros_like(ys), ys)
    if active.numel():
        raise RuntimeError(f"NNLS did not converge for {active.numel()} tokens in {limit} iterations")
    return x.clamp_min(0.0)


def project(features: "torch.Tensor", concepts: "torch.Tensor") -> "torch.Tensor":
    """Non-negative weights of each token on the concepts: (N, D) -> (N, k) or (B, D, h, w) -> (B, k, h, w).

    The computation runs on the features' device in float64 and returns the features' dtype;
    `concepts` (k, D) is read, never modified.
    """
    import torch

    if features.dim() not in (2, 4):
        raise ValueError(f"features must be (N, D) or (B, D, h, w), got shape {tuple(features.shape)}")
    dim = features.shape[1]
    if concepts.dim() != 2 or concepts.shape[1] != dim:
        raise ValueError(f"concepts must be (k, {dim}), got shape {tuple(concepts.shape)}")
    bank = concepts.detach().to(device=features.device, dtype=torch.float64)
    if features.dim() == 4:
        b, _, h, w = features.shape
        tokens = features.detach().permute(0, 2, 3, 1).reshape(-1, dim)
    else:
        tokens = features.detach()
    gram = bank @ bank.T
    weights = solve_normal(gram, tokens.to(torch.float64) @ bank.T)
    out_dtype = features.dtype if features.dtype.is_floating_point else torch.float32
    weights = weights.to(out_dtype)
    if features.dim() == 4:
        return weights.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
    return weights
