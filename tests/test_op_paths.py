"""The two ways into a gmem op (gmem.ops.library): eager calls go through a torch.autograd.Function
that calls the backend directly, torch.compile (of non-traceable backends) through the custom ops.
Both must give the same values and gradients, and each path must really be the one taken."""
import formulas
import pytest
import torch

import gmem.ops as ops
from gmem.ops import LowRank, library

DT = torch.float64


def _backends():
    names = ["reference"]
    if "cpu" in ops.available_backends():
        names.append("cpu")
    return names


def _conv_inputs(mixed: bool, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(5, 3, 7, 6, dtype=DT, requires_grad=True)
    wn = ops.normalize_weight(torch.randn(4, 3, 3, 3, dtype=DT))[0]
    lead = (3,) if mixed else ()
    gamma = torch.randn(*lead, 4, 3, dtype=DT, requires_grad=True)
    beta = torch.randn(*lead, 4, 3, dtype=DT, requires_grad=True)
    bias = torch.randn(*lead, 4, dtype=DT, requires_grad=True)
    ids = torch.tensor([2, 0, 2, 1, 0]) if mixed else None
    return x, wn, gamma, beta, bias, ids


def _grads(out, leaves, seed=1):
    torch.manual_seed(seed)
    return torch.autograd.grad(out, leaves, torch.randn_like(out), retain_graph=True)


def _assert_matches(got, want, leaves, tol=1e-10):
    """``got`` and its gradients w.r.t. ``leaves`` equal those of the formula ``want`` (float64)."""
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for name, a, b in zip(range(len(leaves)), _grads(got, leaves), _grads(want, leaves)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"gradient of leaf {name}: {m}")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("mixed", [False, True])
def test_conv_paths_agree(backend, mixed):
    x, wn, gamma, beta, bias, ids = _conv_inputs(mixed)
    args = (x, wn, gamma, beta, bias, ids, [2, 1], [1, 0], [1, 2], backend)
    leaves = (x, gamma, beta, bias)
    direct = library.modulated_conv2d(*args)
    via_op = library.modulated_conv2d_op(*args)
    assert torch.equal(direct, via_op)
    for a, b in zip(_grads(direct, leaves), _grads(via_op, leaves)):
        assert torch.equal(a, b)
    # and both paths are right: the independent float64 formula (the paths could agree on a wrong value)
    want = formulas.conv2d(x, wn, gamma, beta, bias, ids, stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    _assert_matches(direct, want, leaves)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("mixed", [False, True])
def test_linear_and_weight_paths_agree(backend, mixed):
    torch.manual_seed(2)
    lead = (3,) if mixed else ()
    x = torch.randn(4, 6, dtype=DT, requires_grad=True)
    wn = ops.normalize_weight(torch.randn(5, 6, dtype=DT))[0]
    gamma = torch.randn(*lead, 5, dtype=DT, requires_grad=True)
    beta = torch.randn(*lead, 5, dtype=DT, requires_grad=True)
    ids = torch.tensor([1, 1, 0, 2]) if mixed else None
    args = (x, wn, gamma, beta, None, ids, backend)
    direct, via_op = library.modulated_linear(*args), library.modulated_linear_op(*args)
    assert torch.equal(direct, via_op)
    for a, b in zip(_grads(direct, (x, gamma, beta)), _grads(via_op, (x, gamma, beta))):
        assert torch.equal(a, b)
    _assert_matches(direct, formulas.linear(x, wn, gamma, beta, None, ids), (x, gamma, beta))

    wn4 = ops.normalize_weight(torch.randn(4, 3, 3, 3, dtype=DT))[0]
    g4 = torch.randn(*lead, 4, 3, dtype=DT, requires_grad=True)
    b4 = torch.randn(*lead, 4, 3, dtype=DT, requires_grad=True)
    direct, via_op = library.madafm_weight(wn4, g4, b4, backend), library.madafm_weight_op(wn4, g4, b4, backend)
    assert torch.equal(direct, via_op)
    for a, b in zip(_grads(direct, (g4, b4)), _grads(via_op, (g4, b4))):
        assert torch.equal(a, b)
    _assert_matches(direct, g4[..., None, None] * wn4 + b4[..., None, None], (g4, b4))


def test_eager_calls_never_touch_the_custom_ops(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the eager path went through a custom op")

    for name in ("madafm_weight_op", "modulated_conv2d_op", "modulated_linear_op", "modulated_conv2d_lowrank_op",
                 "madafm_weight_backward_op", "modulated_conv2d_backward_op", "modulated_linear_backward_op"):
        monkeypatch.setattr(library, name, refuse)
    for backend in _backends():
        x, wn, gamma, beta, bias, ids = _conv_inputs(mixed=True)
        y = ops.modulated_conv2d(x, wn, gamma, beta, bias, task_ids=ids, padding=1, backend=backend)
        y.sum().backward()
        z = ops.modulated_linear(torch.randn(2, 3, dtype=DT), torch.randn(4, 3, dtype=DT),
                                 gamma[0, :, 0], beta[0, :, 0], backend=backend)
        assert z.shape == (2, 4)
        w = ops.madafm_weight(wn, gamma[0], beta[0], backend=backend)
        w.sum().backward()


def test_no_grad_calls_skip_the_autograd_functions(monkeypatch):
    # with grad mode off (sampling, replay) there is nothing to record: the backend runs alone,
    # and gives what the autograd path gives
    for backend in _backends():
        x, wn, gamma, beta, bias, ids = _conv_inputs(mixed=True)
        u, s, v = torch.randn(3, 4, 2, dtype=DT), torch.rand(3, 2, dtype=DT) + 0.5, torch.randn(3, 3, 2, dtype=DT)
        z, wl = torch.randn(2, 3, dtype=DT), torch.randn(4, 3, dtype=DT)
        calls = [
            lambda: ops.modulated_conv2d(x, wn, gamma, beta, bias, task_ids=ids, padding=1, backend=backend),
            lambda: ops.modulated_conv2d(x, wn, LowRank(u, s, v), beta, bias, task_ids=ids, padding=1,
                                         backend=backend),
            lambda: ops.modulated_linear(z, wl, gamma[0, :4, 0], beta[0, :4, 0], backend=backend),
            lambda: ops.madafm_weight(wn, gamma, beta, backend=backend),
        ]
        expected = [call().detach() for call in calls]

        def refuse(*args, **kwargs):
            raise AssertionError("a no-grad call went through autograd.Function.apply")

        for function in (library._ModulatedConv2d, library._ModulatedConv2dLowRank, library._ModulatedLinear,
                         library._MadafmWeight):
            monkeypatch.setattr(function, "apply", refuse)
        with torch.no_grad():
            for call, want in zip(calls, expected):
                assert torch.equal(call(), want)
        monkeypatch.undo()


def test_eager_linear_backward_reuses_the_forward_product(monkeypatch):
    # the cpu backend hands x @ Wn^T from its forward to its backward (one GEMM fewer); a backend
    # without it (the reference) gets None and recomputes
    seen = {}
    for name in _backends():
        backend = ops.get_backend(name)
        original = type(backend).modulated_linear_backward

        def spy(self, *args, x_wn=None, _original=original, _name=name):
            seen[_name] = x_wn
            return _original(self, *args, x_wn=x_wn)

        monkeypatch.setattr(type(backend), "modulated_linear_backward", spy)
        z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
        wn = ops.normalize_weight(torch.randn(3, 6, dtype=torch.float64))[0]
        g = torch.randn(3, dtype=torch.float64, requires_grad=True)
        b = torch.randn(3, dtype=torch.float64, requires_grad=True)
        y = ops.modulated_linear(z, wn, g, b, backend=name)
        y.backward(torch.randn_like(y))
        monkeypatch.undo()
    if "cpu" in seen:
        assert seen["cpu"] is not None and seen["cpu"].shape == (4, 3)
    assert seen["reference"] is None


def test_compile_goes_through_the_custom_op():
    """An opaque backend under torch.compile is one gmem:: custom op in the captured graph."""
    seen = []

    def recording_backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    x, wn, gamma, beta, bias, ids = _conv_inputs(mixed=True)
    torch._dynamo.reset()
    f = torch.compile(
        lambda x, g, b: ops.modulated_conv2d(x, wn, g, b, bias, task_ids=ids, padding=1, backend="reference"),
        backend=recording_backend, fullgraph=True,
    )
    y = f(x, gamma, beta)
    assert any("gmem.modulated_conv2d" in target for target in seen), seen
    eager = ops.modulated_conv2d(x, wn, gamma, beta, bias, task_ids=ids, padding=1, backend="reference")
    torch.testing.assert_close(y, eager)


@pytest.mark.parametrize("backend", _backends())
def test_double_backward_on_the_eager_path(backend):
    """R1-style gradient penalty: grad of a grad, through the autograd.Function path."""
    x, wn, gamma, beta, bias, ids = _conv_inputs(mixed=True)
    y = ops.modulated_conv2d(x, wn, gamma, beta, bias, task_ids=ids, padding=1, backend=backend)
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (dgamma,) = torch.autograd.grad(dx.square().sum(), gamma)
    # the oracle: autograd twice through the float64 formula (not the reference backend: the
    # [reference] case would compare the reference with itself)
    y_ref = formulas.conv2d(x, wn, gamma, beta, bias, ids, padding=(1, 1))
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum(), x, create_graph=True)
    (dgamma_ref,) = torch.autograd.grad(dx_ref.square().sum(), gamma)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dgamma, dgamma_ref, rtol=1e-10, atol=1e-10)
    assert dgamma.abs().sum() > 0


def test_lowrank_eager_path_matches_dense():
    torch.manual_seed(3)
    x, wn, *_ = _conv_inputs(mixed=False)
    factors = [torch.randn(4, 2, dtype=DT), torch.rand(2, dtype=DT), torch.randn(3, 2, dtype=DT)]
    factors = [f.requires_grad_() for f in factors]
    beta = torch.randn(4, 3, dtype=DT)
    y = ops.modulated_conv2d(x, wn, LowRank(*factors), beta, padding=1, backend="reference")
    # the dense value built here, not by LowRank.dense() (which the op itself calls)
    u, s, v = factors
    dense = torch.einsum("or,r,ir->oi", u, s, v)
    _assert_matches(y, formulas.conv2d(x, wn, dense, beta, padding=(1, 1)), factors)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("mixed", [False, True])
def test_weight_build_gradcheck_and_double_backward(backend, mixed):
    """madafm_weight: the cpu backend records a C++ autograd node (csrc/autograd.cpp) in eager mode."""
    torch.manual_seed(4)
    lead = (2,) if mixed else ()
    wn = ops.normalize_weight(torch.randn(3, 2, 3, 3, dtype=DT))[0]
    gamma = torch.randn(*lead, 3, 2, dtype=DT, requires_grad=True)
    beta = torch.randn(*lead, 3, 2, dtype=DT, requires_grad=True)
    fn = lambda g, b: ops.madafm_weight(wn, g, b, backend=backend)  # noqa: E731
    torch.testing.assert_close(fn(gamma, beta), gamma[..., None, None] * wn + beta[..., None, None],
                               rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fn, (gamma, beta))
    assert torch.autograd.gradgradcheck(fn, (gamma, beta))
    if backend == "cpu":
        out = fn(gamma, beta)
        assert "MadafmWeightFunction" in out.grad_fn.name()
