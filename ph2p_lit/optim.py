"""Optimisers of the soft prompt that take a closure and evaluate it several times a step.

PH2PStep: the authors' effective update (docs/ARCHITECTURE.md), max_iter gradient steps a step.

BatchedLBFGS: B independent L-BFGS problems stepped together in one closure.
torch.optim.LBFGS flattens all parameters into one vector, so images batched together would share
one curvature history and one stopping rule and the prompt of an image would depend on its
batch mates. This optimiser keeps one history per row of a (B, ...) parameter and follows
torch's LBFGS update (fixed step `lr`, no line search) row by row; with B = 1 it takes the same
steps as torch's.
"""

import torch


class PH2PStep(torch.optim.Optimizer):
    """`max_iter` times per step: evaluate the closure, then p ← p − lr · p.grad.

    With the closure's gradient taken at the projected prompt, this is what the authors' LBFGS
    loop computes once the projection overwrites L-BFGS's own writes. One `step` is one optimiser
    step (Lightning counts it once), however many evaluations it holds. Returns the losses of the
    first evaluation, as torch's LBFGS does.
    """

    def __init__(self, param: torch.Tensor, lr: float = 0.8, max_iter: int = 20):
        super().__init__([param], dict(lr=lr, max_iter=max_iter))

    @torch.no_grad()
    def step(self, closure):
        group = self.param_groups[0]
        (p,) = group["params"]
        first = None
        for _ in range(group["max_iter"]):
            with torch.enable_grad():
                losses = closure()
            first = losses if first is None else first
            p.add_(p.grad, alpha=-group["lr"])
        return first


class BatchedLBFGS(torch.optim.Optimizer):
    """L-BFGS over the rows of one (B, ...) parameter; the closure returns per-row losses (B,).

    A row stops for the current `step` when torch's LBFGS would stop (gradient or change below
    tolerance); the others go on. Inactive rows are not moved.

    max_step: if set, a trust region: the step size of a row is cut so that no vector along the
    parameter's last dimension (one token position) moves further than this. None is torch's rule.
    """

    def __init__(
        self,
        param: torch.Tensor,
        lr: float = 1.0,
        max_iter: int = 20,
        history_size: int = 100,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        max_step: float | None = None,
    ):
        super().__init__([param], dict(lr=lr, max_iter=max_iter, history_size=history_size,
                                       tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                                       max_step=max_step))
        self._param = param

    def _init_state(self, B: int, N: int, device, dtype) -> dict:
        H = self.param_groups[0]["history_size"]
        state = self.state[self._param]
        if "S" not in state:
            state.update(
                S=torch.zeros(B, H, N, device=device, dtype=dtype),  # steps s = x_{k+1} - x_k
                Y=torch.zeros(B, H, N, device=device, dtype=dtype),  # gradient changes y
                rho=torch.zeros(B, H, device=device, dtype=dtype),  # 1 / (y . s)
                head=torch.zeros(B, dtype=torch.long, device=device),
                count=torch.zeros(B, dtype=torch.long, device=device),
                H_diag=torch.ones(B, device=device, dtype=dtype),
                n_iter=torch.zeros(B, dtype=torch.long, device=device),
                d=torch.zeros(B, N, device=device, dtype=dtype),
                t=torch.zeros(B, device=device, dtype=dtype),
                prev_grad=torch.zeros(B, N, device=device, dtype=dtype),
            )
        return state

    def _direction(self, state: dict, grad: torch.Tensor) -> torch.Tensor:
        """Two-loop recursion, all rows at once: -H_k g, (B, N)."""
        S, Y, rho, head, count = state["S"], state["Y"], state["rho"], state["head"], state["count"]
        B, H, _ = S.shape
        rows = torch.arange(B, device=grad.device)
        q = -grad
        alphas = []
        for j in range(H):  # newest to oldest
            idx = (head - 1 - j) % H
            valid = (j < count).to(grad.dtype)
            a = (S[rows, idx] * q).sum(1) * rho[rows, idx] * valid
            q = q - a[:, None] * Y[rows, idx]
            alphas.append((idx, valid, a))
        r = q * state["H_diag"][:, None]
        for idx, valid, a in reversed(alphas):  # oldest to newest
            b = (Y[rows, idx] * r).sum(1) * rho[rows, idx] * valid
            r = r + (a - b)[:, None] * S[rows, idx] * valid[:, None]
        return r

    def _remember(self, state: dict, y: torch.Tensor, s: torch.Tensor, rows: torch.Tensor) -> None:
        ys = (y * s).sum(1)
        accept = rows & (ys > 1e-10)  # torch's curvature condition
        if not accept.any():
            return
        H = state["S"].shape[1]
        i = accept.nonzero().squeeze(1)
        slot = state["head"][i]
        state["S"][i, slot] = s[i]
        state["Y"][i, slot] = y[i]
        state["rho"][i, slot] = 1.0 / ys[i]
        state["head"][i] = (slot + 1) % H
        state["count"][i] = (state["count"][i] + 1).clamp(max=H)
        state["H_diag"][i] = ys[i] / (y[i] * y[i]).sum(1)

    @torch.no_grad()
    def step(self, closure):
        g = self.param_groups[0]  # not self.defaults: a scheduler or a restored state changes the group
        p = self._param
        B = p.shape[0]
        with torch.enable_grad():
            losses = closure().detach()
        orig_losses = losses.clone()
        grad = p.grad.reshape(B, -1).to(torch.float32)
        state = self._init_state(B, grad.shape[1], grad.device, grad.dtype)
        active = grad.abs().amax(1) > g["tolerance_grad"]
        evals = torch.ones(B, dtype=torch.long, device=grad.device)
        max_eval = g["max_iter"] * 5 // 4
        for n_iter in range(1, g["max_iter"] + 1):
            if not active.any():
                break
            state["n_iter"] += active.long()
            first = state["n_iter"] == 1
            later = active & ~first
            self._remember(state, grad - state["prev_grad"], state["d"] * state["t"][:, None], later)
            d = torch.where(first[:, None], -grad, self._direction(state, grad))
            state["d"] = torch.where(active[:, None], d, state["d"])
            state["prev_grad"] = torch.where(active[:, None], grad, state["prev_grad"])
            t = torch.where(first, torch.clamp(1.0 / grad.abs().sum(1), max=1.0) * g["lr"], torch.full_like(state["t"], g["lr"]))
            if g["max_step"] is not None:
                longest = state["d"].view(*p.shape).norm(dim=-1).flatten(1).amax(1)  # (B,)
                t = torch.minimum(t, g["max_step"] / longest.clamp_min(1e-12))
            state["t"] = torch.where(active, t, state["t"])
            gtd = (grad * state["d"]).sum(1)
            active &= gtd <= -g["tolerance_change"]  # not a descent direction: stop this row
            move = (state["d"] * state["t"][:, None]) * active[:, None]
            p.add_(move.view_as(p).to(p.dtype))
            if n_iter == g["max_iter"] or not active.any():
                break
            prev_losses = losses
            with torch.enable_grad():
                losses = closure().detach()
            grad = p.grad.reshape(B, -1).to(torch.float32)
            evals += active.long()
            active &= grad.abs().amax(1) > g["tolerance_grad"]
            active &= move.abs().amax(1) > g["tolerance_change"]
            active &= (losses - prev_losses).abs() >= g["tolerance_change"]
            active &= evals < max_eval
        return orig_losses
