"""Batched, exact non-negative least squares of token features against a concept bank.

For every token feature `a` (length D) and a bank `C` (k, D) we solve
``min_w ||a - w C||^2  subject to  w >= 0``. All tokens share the Gram matrix
``G = C C^T``, so the problem is solved in normal-equation form, in float64, on whatever
device the features are on:

1. a few accelerated projected-gradient steps (batched matrix products) guess each token's
   passive set (the weights that will be positive);
2. batched block principal pivoting (an active-set method that exchanges many variables per
   step, with a single-variable backup rule that guarantees termination) then moves every
   token to its exact optimum; each step solves the unconstrained problem on each token's
   passive set with one batched Cholesky solve of compact systems.

The result satisfies the optimality (KKT) conditions to a tight tolerance: it is the exact
NNLS solution up to rounding, not an iterative approximation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# relative tolerance on the optimality (KKT) conditions, scaled by each token's magnitude
KKT_TOLERANCE = 1e-10
# a ridge this small (relative to the Gram diagonal) only matters for duplicate concepts
RIDGE = 1e-12
# tokens per batched solve: chunk * k * k float64 numbers stay below this many
MAX_SOLVE_ELEMENTS = 1 << 23
# accelerated projected-gradient steps that guess the passive sets before the exact pivoting
WARM_START_ITERATIONS = 100
# backup rule: full exchanges allowed without progress before exchanging one variable
FULL_EXCHANGE_TRIES = 3


def _solve_passive(gram: "torch.Tensor", rhs: "torch.Tensor", passive: "torch.Tensor") -> "torch.Tensor":
    """Solve G_FF x_F = b_F per row for each row's passive set F (x is zero outside F).

    Each row's passive variables are gathered into a compact m x m system (m = the largest
    passive set of the chunk, padded with the identity), so sparse solutions cost m^3, not k^3.
    """
    import torch

    n, k = rhs.shape
    out = torch.zeros_like(rhs)
    counts = passive.sum(dim=1)
    order = torch.argsort(counts)
    ridge = RIDGE * gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    chunk = max(1, MAX_SOLVE_ELEMENTS // (k * k))
    for start in range(0, n, chunk):
        rows = order[start : start + chunk]
        m = int(counts[rows[-1]])
        if m == 0:
            continue
        cols = torch.argsort((~passive[rows]).to(torch.int8), dim=1, stable=True)[:, :m]
        valid = torch.arange(m, device=rhs.device)[None, :] < counts[rows][:, None]
        pair = valid[:, :, None] & valid[:, None, :]
        eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
        system = torch.where(pair, gram[cols[:, :, None], cols[:, None, :]], torch.zeros((), dtype=gram.dtype, device=gram.device))
        system = system + eye * torch.where(valid, ridge, 1.0)[:, :, None].to(gram.dtype)
        values = torch.where(valid, rhs[rows].gather(1, cols), torch.zeros((), dtype=rhs.dtype, device=rhs.device))
        solution = torch.cholesky_solve(values[:, :, None], torch.linalg.cholesky(system))[:, :, 0]
        out[rows] = torch.zeros_like(values[:, :1]).expand(-1, k).scatter(1, cols, solution * valid)
    return out


def _warm_start(gram: "torch.Tensor", rhs: "torch.Tensor", iterations: int) -> "torch.Tensor":
    """An approximate solution by accelerated projected gradient (FISTA): a guess of the passive sets."""
    import torch

    step = 1.0 / torch.linalg.eigvalsh(gram)[-1].clamp_min(torch.finfo(gram.dtype).tiny)
    x = torch.zeros_like(rhs)
    z, t = x, 1.0
    for _ in range(iterations):
        following = (z - (z @ gram - rhs) * step).clamp_min(0.0)
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        z = following + ((t - 1.0) / t_next) * (following - x)
        x, t = following, t_next
    return x


def solve_normal(gram: "torch.Tensor", rhs: "torch.Tensor", max_iterations: int | None = None) -> "torch.Tensor":
    """Solve ``min_w 0.5 w^T G w - b^T w, w >= 0`` for each row b of `rhs` (N, k); returns (N, k)."""
    import torch

    n, k = rhs.shape
    limit = max_iterations if max_iterations is not None else 20 * k + 50
    # start from the support of an approximate solution: usually few exchanges remain
    passive = _warm_start(gram, rhs, WARM_START_ITERATIONS) > 0
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
