"""The one way into a gmem op (gmem.ops._ops): the public functions call ``torch.ops.gmem.*``, whose
Autograd kernel runs the backend chosen by the context (``use_backend``, ``backend=``,
``GMEM_BACKEND``, "auto"); eager calls and torch.compile reach that same registered op. Public calls
and direct op calls must give the same values and gradients, and the path must really be that one."""
import threading

import formulas
import pytest
import torch

import gmem.ops as ops
from gmem.ops import LowRank, _ops

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


def _node_backend(out) -> str:
    """The backend that computed ``out = madafm_weight(...)``, from the autograd node it recorded:
    the C++ node of csrc/madafm.cpp (the cpu backend's kernels, chosen by a public call) or the
    Python node of gmem.ops._ops, which holds the backend it ran."""
    name = out.grad_fn.name()
    if "MadafmWeightFunction" in name:
        return "cpu"
    assert name == "_MadafmWeightBackward", name
    return out.grad_fn.impl.name


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
    args = (x, wn, gamma, beta, bias, ids, [2, 1], [1, 0], [1, 2])
    leaves = (x, gamma, beta, bias)
    direct = ops.modulated_conv2d(x, wn, gamma, beta, bias, task_ids=ids, stride=(2, 1), padding=(1, 0),
                                  dilation=(1, 2), backend=backend)
    with ops.use_backend(backend):
        via_op = torch.ops.gmem.modulated_conv2d(*args)
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
    direct = ops.modulated_linear(x, wn, gamma, beta, None, task_ids=ids, backend=backend)
    with ops.use_backend(backend):
        via_op = torch.ops.gmem.modulated_linear(x, wn, gamma, beta, None, ids)
    assert torch.equal(direct, via_op)
    for a, b in zip(_grads(direct, (x, gamma, beta)), _grads(via_op, (x, gamma, beta))):
        assert torch.equal(a, b)
    _assert_matches(direct, formulas.linear(x, wn, gamma, beta, None, ids), (x, gamma, beta))

    wn4 = ops.normalize_weight(torch.randn(4, 3, 3, 3, dtype=DT))[0]
    g4 = torch.randn(*lead, 4, 3, dtype=DT, requires_grad=True)
    b4 = torch.randn(*lead, 4, 3, dtype=DT, requires_grad=True)
    direct = ops.madafm_weight(wn4, g4, b4, backend=backend)
    with ops.use_backend(backend):
        via_op = torch.ops.gmem.madafm_weight(wn4, g4, b4)
    assert torch.equal(direct, via_op)
    for a, b in zip(_grads(direct, (g4, b4)), _grads(via_op, (g4, b4))):
        assert torch.equal(a, b)
    _assert_matches(direct, g4[..., None, None] * wn4 + b4[..., None, None], (g4, b4))


def test_eager_and_compiled_calls_reach_the_same_registered_op(monkeypatch):
    """One path: eager calls and torch.compile both run the Autograd kernel registered on gmem::
    (which chooses the backend), and the compiled graph holds that op."""
    routed = []
    route = _ops._route
    monkeypatch.setattr(_ops, "_route", lambda x: routed.append(x.device.type) or route(x))
    x, wn, gamma, beta, bias, ids = _conv_inputs(mixed=True)
    for backend in _backends():
        routed.clear()
        y = ops.modulated_conv2d(x, wn, gamma, beta, bias, task_ids=ids, padding=1, backend=backend)
        y.sum().backward()
        assert routed == ["cpu"], routed  # the op's Autograd kernel ran once
        assert y.grad_fn.name() == "_ModulatedConv2dBackward"
    seen = []

    def recording_backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    routed.clear()
    torch._dynamo.reset()
    f = torch.compile(lambda x, g, b: ops.modulated_conv2d(x, wn, g, b, bias, task_ids=ids, padding=1),
                      backend="aot_eager", fullgraph=True)
    with ops.use_backend(_backends()[-1]):
        y = f(x, gamma, beta)
    assert routed, "compile did not run the op's Autograd kernel"
    torch._dynamo.reset()
    g = torch.compile(lambda x, g, b: ops.modulated_conv2d(x, wn, g, b, bias, task_ids=ids, padding=1),
                      backend=recording_backend, fullgraph=True)
    g(x, gamma, beta)
    assert "gmem.modulated_conv2d.default" in seen, seen
    torch.testing.assert_close(y, ops.modulated_conv2d(x, wn, gamma, beta, bias, task_ids=ids, padding=1))


def test_use_backend_is_a_per_thread_context_and_backend_is_its_shorthand(monkeypatch):
    monkeypatch.delenv("GMEM_BACKEND", raising=False)
    wn = ops.normalize_weight(torch.randn(3, 2, 3, 3, dtype=DT))[0]
    g, b = torch.randn(3, 2, dtype=DT), torch.randn(3, 2, dtype=DT)
    auto = ops.backends.resolve_backend("auto", wn.device, wn.dtype, "t")  # (runs the self-check, if due, now)
    chosen = []

    def weight(*args, **kwargs):  # records the backend that ran (from the autograd node it recorded)
        chosen.append(_node_backend(ops.madafm_weight(wn, g.requires_grad_(), b.requires_grad_(), *args, **kwargs)))

    with ops.use_backend("reference"):
        assert ops.current_backend() == "reference"
        weight()
        with ops.use_backend("auto"):  # nested blocks override outer ones
            weight()
        weight(backend=_backends()[-1])  # the keyword beats the context
    weight()
    assert chosen == ["reference", auto, _backends()[-1], auto]
    monkeypatch.setenv("GMEM_BACKEND", "reference")  # the environment variable: for a whole run
    chosen.clear()
    weight()
    with ops.use_backend(_backends()[-1]):
        weight()
    assert chosen == ["reference", _backends()[-1]]
    monkeypatch.delenv("GMEM_BACKEND")
    # per thread: a thread inside use_backend does not change another thread's choice
    seen, barrier = {}, threading.Barrier(2)

    def worker(name):
        with ops.use_backend(name):
            barrier.wait()
            seen[name] = ops.current_backend()
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("reference", _backends()[-1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"reference": "reference", _backends()[-1]: _backends()[-1]}
    assert ops.current_backend() == "auto"
    with pytest.raises(ValueError, match="backend='nope' is unknown"):
        with ops.use_backend("nope"):
            pass


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

        for function in (_ops._ModulatedConv2d, _ops._ModulatedConv2dLowRank, _ops._ModulatedLinear,
                         _ops._MadafmWeight):
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
    """Under torch.compile a public op is one gmem:: op in the captured graph."""
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
    """R1-style gradient penalty: grad of a grad, through the op's autograd."""
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
    """madafm_weight: every backend records the op's autograd node (the C++ one for the cpu backend)."""
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
    out = fn(gamma, beta)
    assert _node_backend(out) == backend


@pytest.mark.skipif("cpu" not in ops.available_backends(), reason="needs the compiled extension")
def test_weight_build_runs_its_cpp_autograd_kernel_only_for_its_own_calls(monkeypatch):
    """The C++ Autograd kernel of madafm_weight (csrc/madafm.cpp) shadows the Python one on the
    CPU: it runs the C++ kernels itself only for a public call that chose the cpu backend; every
    other call (another backend, a direct op call, half precision, tracing) goes to the Python
    kernel, which chooses as before."""
    monkeypatch.delenv("GMEM_BACKEND", raising=False)
    assert _ops.kernel_for("madafm_weight", "AutogradCPU")
    wn = ops.normalize_weight(torch.randn(4, 3, 3, 3, dtype=DT))[0]
    g = torch.randn(2, 4, 3, dtype=DT, requires_grad=True)
    b = torch.randn(2, 4, 3, dtype=DT, requires_grad=True)
    assert _node_backend(ops.madafm_weight(wn, g, b, backend="cpu")) == "cpu"
    assert "MadafmWeightFunction" in ops.madafm_weight(wn, g, b, backend="cpu").grad_fn.name()
    assert _node_backend(ops.madafm_weight(wn, g, b, backend="reference")) == "reference"
    with ops.use_backend("cpu"):  # a direct call: the Python kernel, with the backend of the context
        out = torch.ops.gmem.madafm_weight(wn, g, b)
    assert out.grad_fn.name() == "_MadafmWeightBackward" and out.grad_fn.impl.name == "cpu"
    with ops.use_backend("cpu"):  # CPU bfloat16: the Python kernel (computed in float32 there)
        half = ops.madafm_weight(wn.bfloat16(), g.bfloat16(), b.bfloat16())
    assert half.grad_fn.name() == "_MadafmWeightBackward" and half.grad_fn.impl.name == "cpu"
    # the flag lives for one call only, and errors raised in the Python kernel come through as they are
    monkeypatch.setenv("GMEM_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend='nope' is unknown"):
        torch.ops.gmem.madafm_weight(wn, g, b)
    monkeypatch.delenv("GMEM_BACKEND")
    # no grad wanted: no node, the same values
    with torch.no_grad():
        assert torch.equal(ops.madafm_weight(wn, g, b, backend="cpu"), ops.madafm_weight(wn, g, b, backend="reference"))
    # first and second order gradients agree with the reference's
    for create_graph in (False, True):
        grads = [torch.autograd.grad(ops.madafm_weight(wn, g, b, backend=name).square().sum(), (g, b),
                                     create_graph=create_graph) for name in ("cpu", "reference")]
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            assert got.requires_grad == create_graph


needs_extension = pytest.mark.skipif("cpu" not in ops.available_backends(), reason="needs the compiled extension")


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(), (3,)])
def test_weight_build_common_call_takes_the_one_step_entry(dtype, lead, monkeypatch):
    """madafm_weight's common call (a conv weight, dense styles, autocast off, the cpu backend) is
    one C++ step (gmem._C.madafm_weight): the Python checks are skipped, the op reached is the same
    registered one, and values, gradients and the recorded node equal a direct op call's."""
    monkeypatch.delenv("GMEM_BACKEND", raising=False)
    torch.manual_seed(5)
    wn = ops.normalize_weight(torch.randn(5, 4, 3, 2, dtype=dtype))[0]
    gamma = torch.nn.Parameter(torch.randn(*lead, 5, 4, dtype=dtype))  # parameters, as layers hold them
    beta = torch.randn(*lead, 5, 4, dtype=dtype, requires_grad=True)
    from gmem.ops import functional

    assert ops.backends.resolve_backend("auto", wn.device, dtype, "t") == "cpu"  # (self-check, if due, now)

    def no_python_checks(*args, **kwargs):
        raise AssertionError("the common call went through the Python checks")

    monkeypatch.setattr(functional, "_style_pair", no_python_checks)
    for backend in ("cpu", "auto"):
        out = ops.madafm_weight(wn, gamma, beta, backend=backend)
        assert "MadafmWeightFunction" in out.grad_fn.name()
        with ops.use_backend("cpu"):
            want = torch.ops.gmem.madafm_weight(wn, gamma, beta)
        assert torch.equal(out, want)
        for a, b in zip(_grads(out, (gamma, beta)), _grads(want, (gamma, beta))):
            assert torch.equal(a, b)
        with torch.no_grad():
            assert torch.equal(ops.madafm_weight(wn, gamma, beta, backend=backend), want)
    # the thread's kernel flag is back to what it was (off) after the call
    assert ops.get_backend("cpu").kernel_switch(False) is False
    monkeypatch.undo()
    # a reference call is not taken by the entry
    assert _node_backend(ops.madafm_weight(wn, gamma, beta, backend="reference")) == "reference"


@needs_extension
def test_weight_build_entry_leaves_every_other_call_to_python():
    """The one-step entry answers None (the Python function then takes the call and raises its
    errors) for anything but the common valid call."""
    entry = lambda *args: ops.backends.call_entry("cpu", "madafm_weight", *args)  # noqa: E731
    wn = ops.normalize_weight(torch.randn(4, 3, 3, 3))[0]
    g, b = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(entry(wn, g, b), g[..., None, None] * wn + b[..., None, None])  # (FMA rounding)

    class Marked(torch.Tensor):
        pass

    others = {
        "linear weight": (torch.randn(4, 3), torch.randn(4), torch.randn(4)),
        "low rank": (wn, LowRank(torch.randn(4, 1), torch.ones(1), torch.randn(3, 1)), b),
        "CPU float16": (wn.half(), g.half(), b.half()),
        "mixed dtypes": (wn, g.double(), b),
        "beta's shape": (wn, g, b[:, :2]),
        "gamma's shape": (wn, g.t().contiguous(), b.t().contiguous()),
        "meta": (wn.to("meta"), g.to("meta"), b.to("meta")),
        "a subclass": (wn, g.as_subclass(Marked), b),
        "not a tensor": (wn, g.tolist(), b),
        "two arguments": (wn, g),
    }
    for what, args in others.items():
        assert entry(*args) is None, what
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert entry(wn, g, b) is None
        assert ops.madafm_weight(wn, g, b).dtype == torch.bfloat16  # the Python path: autocast's dtype
    with pytest.raises(TypeError, match="gamma has dtype torch.float64"):  # the Python function's error
        ops.madafm_weight(wn, g.double(), b)
    with pytest.raises(ValueError, match="beta must have the shape of gamma"):
        ops.madafm_weight(wn, g, b[:, :2])

    seen = []

    class Recording(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recording():  # a torch function mode sees the op: the entry stands aside
        assert entry(wn, g, b) is None
        out = ops.madafm_weight(wn, g, b, backend="cpu")
    assert any("gmem.madafm_weight" in name for name in seen), seen
    torch.testing.assert_close(out, g[..., None, None] * wn + b[..., None, None])


@needs_extension
def test_the_extension_imported_first_still_finds_its_python_autograd():
    """``import gmem._C`` before any op call loads the C++ Autograd kernel before gmem.ops has handed
    it the Python one: a call for another backend must still work (it fetches it)."""
    import subprocess
    import sys

    code = (
        "import torch, gmem._C\n"
        "wn = torch.randn(4, 3, 3, 3); g = torch.randn(4, 3, requires_grad=True); b = torch.randn(4, 3)\n"
        "out = torch.ops.gmem.madafm_weight(wn, g, b)\n"
        "out.sum().backward()\n"
        "assert torch.allclose(g.grad, wn.sum((-2, -1)))\n"
        "print('ok', out.grad_fn.name())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ok _MadafmWeightBackward" in done.stdout


@needs_extension
def test_weight_build_entry_and_python_calls_in_threads_keep_their_backends():
    """The entry releases the GIL around the op call and its kernel flag is per thread: threads
    calling the cpu backend (one C++ step) and the reference (Python kernel) at once each record
    their own backend's node and get the right gradients."""
    wn = ops.normalize_weight(torch.randn(8, 4, 3, 3))[0]
    errors = []

    def work(name):
        try:
            for _ in range(100):
                g = torch.randn(8, 4, requires_grad=True)
                b = torch.randn(8, 4, requires_grad=True)
                out = ops.madafm_weight(wn, g, b, backend=name)
                if _node_backend(out) != name:
                    errors.append((name, out.grad_fn.name()))
                out.sum().backward()
                torch.testing.assert_close(g.grad, wn.sum((-2, -1)))
                torch.testing.assert_close(b.grad, torch.full_like(b, 9.0))
        except Exception as err:  # reported below: an assert in a thread would be lost
            errors.append(repr(err))

    threads = [threading.Thread(target=work, args=(name,)) for name in ("cpu", "reference") * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
