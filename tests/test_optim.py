import torch

from ph2p_lit.optim import BatchedLBFGS, PH2PStep


def _problem(seed=0, rows=3, n=10):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rows, n, n, generator=g)
    A = A @ A.transpose(1, 2) + torch.eye(n)
    b = torch.randn(rows, n, generator=g)
    x0 = torch.randn(rows, n, generator=g)

    def f(x, i):  # smooth, non-quadratic
        return 0.5 * x @ A[i] @ x - b[i] @ x + 0.1 * (x**4).sum()

    return f, x0


def _run_batched(f, x0, rows, steps=4, **kw):
    X = x0[rows].clone().requires_grad_(True)
    opt = BatchedLBFGS(X, **kw)
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            losses = torch.stack([f(X[j], i) for j, i in enumerate(rows)])
            losses.sum().backward()
            return losses
        opt.step(closure)
    return X.detach()


def test_rows_follow_torch_lbfgs():
    f, x0 = _problem()
    kw = dict(lr=0.5, max_iter=7, history_size=5)
    expected = []
    for i in range(3):
        x = x0[i].clone().requires_grad_(True)
        opt = torch.optim.LBFGS([x], **kw)
        for _ in range(4):
            def closure():
                opt.zero_grad()
                loss = f(x, i)
                loss.backward()
                return loss
            opt.step(closure)
        expected.append(x.detach())
    assert torch.allclose(_run_batched(f, x0, [0, 1, 2], **kw), torch.stack(expected), atol=1e-5)


def test_a_row_does_not_depend_on_its_batch_mates():
    f, x0 = _problem()
    alone = _run_batched(f, x0, [1], lr=1.0, max_iter=5)
    together = _run_batched(f, x0, [0, 1, 2], lr=1.0, max_iter=5)
    assert torch.allclose(alone[0], together[1], atol=1e-6)


def test_closure_evaluations_per_step():
    f, x0 = _problem()
    X = x0.clone().requires_grad_(True)
    opt = BatchedLBFGS(X, lr=0.1, max_iter=6)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        losses = torch.stack([f(X[i], i) for i in range(3)])
        losses.sum().backward()
        return losses

    opt.step(closure)
    assert len(calls) == 6  # torch's LBFGS: one evaluation per iteration, none after the last


def test_trust_region_bounds_each_vectors_move():
    f, x0 = _problem()
    X = (x0 * 10).view(3, 5, 2).clone().requires_grad_(True)  # far from the minimum: big steps
    opt = BatchedLBFGS(X, lr=1.0, max_iter=1, max_step=0.05)
    for _ in range(5):
        before = X.detach().clone()

        def closure():
            opt.zero_grad()
            losses = torch.stack([f(X[i].flatten(), i) for i in range(3)])
            losses.sum().backward()
            return losses

        opt.step(closure)
        moved = (X.detach() - before).norm(dim=-1)
        assert moved.max() <= 0.05 + 1e-6 and moved.max() > 0.01


def test_ph2p_step_takes_max_iter_gradient_steps():
    f, x0 = _problem()
    X = x0.clone().requires_grad_(True)
    opt = PH2PStep(X, lr=0.01, max_iter=3)
    expected = x0.clone()
    for _ in range(3):
        x = expected.clone().requires_grad_(True)
        sum(f(x[i], i) for i in range(3)).backward()
        expected -= 0.01 * x.grad

    def closure():
        opt.zero_grad()
        losses = torch.stack([f(X[i], i) for i in range(3)])
        losses.sum().backward()
        return losses.detach()

    first = opt.step(closure)
    assert torch.allclose(X.detach(), expected, atol=1e-6)
    assert torch.allclose(first, torch.stack([f(x0[i], i) for i in range(3)]))


def test_lbfgs_follows_its_param_group_not_its_defaults():
    """A scheduler (or a restored state) writes the param group: a changed lr must change the step."""
    f, x0 = _problem()
    rows = [0]

    def one_step(lr_after):
        X = x0[rows].clone().requires_grad_(True)
        opt = BatchedLBFGS(X, lr=1.0, max_iter=1)
        opt.param_groups[0]["lr"] = lr_after

        def closure():
            opt.zero_grad()
            loss = f(X[0], 0).unsqueeze(0)
            loss.backward()
            return loss
        opt.step(closure)
        return (X.detach() - x0[rows]).norm()

    assert one_step(0.1) < 0.5 * one_step(1.0)
