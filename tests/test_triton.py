"""The "triton" backend (gmem_kernels) against the float64 formulas.

Without a GPU these run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before anything imports Triton) at tiny shapes: the interpreter is slow. With a CUDA GPU the same
tests run on the GPU, plus the GPU-only tests at real shapes and in bfloat16 at the end.
"""
import importlib.util
import os
import pathlib
import random

import formulas
import pytest
import torch

import gmem.ops as ops
from gmem.ops import LowRank

modulated_conv2d_op = torch.ops.gmem.modulated_conv2d.default
modulated_conv2d_lowrank_op = torch.ops.gmem.modulated_conv2d_lowrank.default
modulated_linear_op = torch.ops.gmem.modulated_linear.default

HAS_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if HAS_GPU else "cpu"

if "triton" not in ops.available_backends():
    if importlib.util.find_spec("triton") is not None and (HAS_GPU or INTERPRET):
        # Triton is installed and there is a GPU or its interpreter was asked for: the backend must work,
        # so a broken Triton (an import error, a version that does not fit) fails here instead of skipping
        from gmem.ops import _triton_backend

        raise RuntimeError(f"Triton is installed and {'a GPU is present' if HAS_GPU else 'TRITON_INTERPRET=1'}, "
                           f"but the triton backend is unavailable: {_triton_backend.import_error()}")
    pytest.skip(
        "triton backend unavailable (needs Triton and a CUDA GPU, or TRITON_INTERPRET=1 before import)",
        allow_module_level=True,
    )

F32 = torch.float32


@pytest.fixture(autouse=True)
def _exact_fp32():
    # compare fp32 kernels with fp64 formulas: no tf32 (the interpreter never uses it anyway)
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):  # torch < 2.9: the legacy switch only
        before = matmul.allow_tf32
        matmul.allow_tf32 = False
        yield
        matmul.allow_tf32 = before
        return
    before = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    yield
    matmul.fp32_precision = before


def set_tf32(allowed: bool) -> None:
    """Allow or forbid tf32 for float32 matmuls (restored by the autouse fixture)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if allowed else "ieee"
    else:
        matmul.allow_tf32 = allowed


def assert_near(got, want, tol=2e-4, what=""):
    """``max |got - want| <= tol * (1 + max |want|)`` (fp32 kernels vs fp64 formulas)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    scale = 1.0 + (want.double().abs().max().item() if want.numel() else 0.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def rand(*shape, dtype=F32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def conv_case(n, i, o, kh, kw, h, w, t=None, bias="task", task_ids=None):
    """Random conv inputs; ``t`` stacked tasks (None: single task); bias None, "shared" [O] or "task"."""
    lead = () if t is None else (t,)
    x = rand(n, i, h, w)
    weight_norm = ops.normalize_weight(rand(o, i, kh, kw))[0]
    gamma, beta = rand(*lead, o, i), rand(*lead, o, i)
    if bias is None:
        b = None
    elif bias == "shared" or t is None:
        b = rand(o)
    else:
        b = rand(t, o)
    if t is not None and task_ids is None:
        task_ids = torch.randint(0, t, (n,), device=DEVICE)
    return x, weight_norm, gamma, beta, b, task_ids


def check_conv(x, weight_norm, gamma, beta, bias, task_ids, tol=2e-4, **conv):
    """Forward and every gradient of backend="triton" against formulas.conv2d (float64)."""
    leaves = [x, gamma, beta] + ([bias] if bias is not None else [])
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    x_, g_, b_ = leaves[:3]
    c_ = leaves[3] if bias is not None else None
    y = ops.modulated_conv2d(x_, weight_norm, g_, b_, c_, task_ids=task_ids, backend="triton", **conv)
    conv64 = {k: (v, v) if isinstance(v, int) else v for k, v in conv.items()}
    exp_leaves = [t.detach().double().requires_grad_() for t in leaves]
    expected = formulas.conv2d(
        exp_leaves[0], weight_norm.double(), exp_leaves[1], exp_leaves[2],
        exp_leaves[3] if bias is not None else None, task_ids, **conv64,
    )
    assert y.dtype == x.dtype
    assert_near(y, expected, tol, "forward")
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(y, leaves, grad.to(y.dtype))
    want = torch.autograd.grad(expected, exp_leaves, grad)
    for name, g, e in zip(["dx", "dgamma", "dbeta", "dbias"], got, want):
        assert_near(g, e, tol, name)


# ---------------------------------------------------------------------------------------------
# wiring
# ---------------------------------------------------------------------------------------------
def test_backend_registered_and_auto_policy():
    backend = ops.get_backend("triton")
    assert backend.is_available()
    assert backend.auto_eligible(torch.device("cuda"))
    assert not backend.auto_eligible(torch.device("cpu"))  # the interpreter is never picked by "auto"
    from gmem.ops.backends import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), F32, "t") != "triton"


def test_float64_is_refused_with_a_clear_error():
    x, wn, g, b, c, _ = conv_case(1, 2, 2, 1, 1, 3, 3)
    with pytest.raises(ValueError, match="triton.*float64"):
        ops.modulated_conv2d(x.double(), wn.double(), g.double(), b.double(), backend="triton")


def test_tf32_follows_the_torch_setting():
    from gmem_kernels import _config

    set_tf32(True)
    assert _config.torch_allows_tf32()
    assert _config.dot_precision(torch.float16) == "ieee"
    assert _config.dot_precision(F32) == ("ieee" if INTERPRET else "tf32")
    set_tf32(False)
    assert not _config.torch_allows_tf32() and _config.dot_precision(F32) == "ieee"


def test_window_loops_never_use_8_warps():
    # Guard against the Triton miscompile of loops over a non-1x1 window at num_warps=8.
    from gmem_kernels import conv

    for configs in (conv._gemm_configs(), conv._wgrad_configs()):
        assert configs and all(c.num_warps <= 4 for c in configs)


# ---------------------------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------------------------
def random_conv(seed, mixed):
    rng = random.Random(seed)
    kh, kw = rng.choice([1, 2, 3]), rng.choice([1, 3])
    stride = (rng.randint(1, 2), rng.randint(1, 3))
    padding = (rng.randint(0, 2), rng.randint(0, 1))
    dilation = (rng.randint(1, 2), rng.randint(1, 2))
    h = rng.randint(dilation[0] * (kh - 1) + 1, 8)
    w = rng.randint(dilation[1] * (kw - 1) + 1, 8)
    case = conv_case(
        rng.randint(1, 4), rng.randint(1, 19), rng.randint(1, 18), kh, kw, h, w,
        t=rng.randint(1, 5) if mixed else None, bias=rng.choice([None, "shared", "task"]),
    )
    return case, dict(stride=stride, padding=padding, dilation=dilation)


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_conv_random_cases(seed, mixed):
    torch.manual_seed(seed)
    case, conv = random_conv(seed * 2 + mixed, mixed)
    check_conv(*case, **conv)


def test_conv_masks_with_odd_sizes_over_several_tiles():
    # 17..33-wide channel counts and rows cross 16-wide tiles: every mask edge is exercised
    torch.manual_seed(1)
    check_conv(*conv_case(3, 17, 33, 3, 3, 7, 6, t=3), stride=1, padding=1)


@pytest.mark.parametrize(
    "conv",
    [dict(stride=2, padding=1), dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1)), dict(dilation=2, padding=2)],
)
def test_conv_stride_padding_dilation(conv):
    torch.manual_seed(2)
    check_conv(*conv_case(2, 3, 5, 3, 3, 9, 8, t=2), **conv)


def test_conv_tasks_absent_and_more_tasks_than_samples():
    torch.manual_seed(3)
    task_ids = torch.tensor([5, 1, 5], device=DEVICE)  # 7 tasks stored, 2 present, 3 samples
    check_conv(*conv_case(3, 4, 5, 3, 3, 5, 5, t=7, task_ids=task_ids), padding=1)


def test_conv_one_task_only_stacked_and_all_samples_one_task():
    torch.manual_seed(4)
    check_conv(*conv_case(3, 4, 5, 3, 1, 5, 5, t=1), padding=(1, 0))
    same = torch.full((4,), 2, device=DEVICE)
    check_conv(*conv_case(4, 3, 6, 1, 1, 4, 3, t=3, task_ids=same))


def test_conv_channels_last_input():
    torch.manual_seed(5)
    x, wn, g, b, c, tid = conv_case(2, 5, 4, 3, 3, 6, 5, t=2)
    check_conv(x.to(memory_format=torch.channels_last), wn, g, b, c, tid, padding=1)


def test_conv_partial_output_mask():
    # only gamma needs a gradient: x, beta and bias get none and must not break the backward
    torch.manual_seed(6)
    x, wn, g, b, c, tid = conv_case(2, 3, 4, 3, 3, 5, 5, t=3)
    g = g.clone().requires_grad_()
    y = ops.modulated_conv2d(x, wn, g, b, c, task_ids=tid, padding=1, backend="triton")
    (dg,) = torch.autograd.grad(y.sum(), [g])
    g64 = g.detach().double().requires_grad_()
    y64 = formulas.conv2d(x, wn.double(), g64, b.double(), c.double(), tid, padding=(1, 1))
    (want,) = torch.autograd.grad(y64.sum(), [g64])
    assert_near(dg, want, what="dgamma")


def test_conv_backend_methods_directly_with_output_mask_and_zero_samples():
    backend = ops.get_backend("triton")
    x, wn, g, b, c, tid = conv_case(0, 3, 4, 3, 3, 5, 5, t=2)
    y = backend.modulated_conv2d(x, wn, g, b, c, tid, [1, 1], [1, 1], [1, 1])
    assert y.shape == (0, 4, 5, 5)
    dx, dg, db, dc = backend.modulated_conv2d_backward(
        torch.zeros_like(y), x, wn, g, b, c, tid, [1, 1], [1, 1], [1, 1], [True, True, False, True]
    )
    assert dx.shape == x.shape and db is None
    assert torch.equal(dg, torch.zeros_like(g)) and torch.equal(dc, torch.zeros_like(c))


def test_conv_backward_is_deterministic():
    torch.manual_seed(7)
    x, wn, g, b, c, tid = conv_case(4, 6, 5, 3, 3, 6, 6, t=3)
    backend = ops.get_backend("triton")
    dy = torch.randn(4, 5, 6, 6, device=DEVICE)
    run = lambda: backend.modulated_conv2d_backward(  # noqa: E731
        dy, x, wn, g, b, c, tid, [1, 1], [1, 1], [1, 1], [True] * 4
    )
    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


def test_conv_float16_with_fp32_accumulation():
    torch.manual_seed(8)
    x, wn, g, b, c, tid = conv_case(2, 5, 6, 3, 3, 5, 5, t=2)
    half = [t.half() for t in (x, wn, g, b, c)]
    check_conv(half[0], half[1], half[2], half[3], half[4], tid, tol=1e-2, padding=1)


def test_conv_lowrank_styles():
    torch.manual_seed(9)
    t, o, i, r = 3, 6, 5, 2
    x, wn, _, _, c, tid = conv_case(3, i, o, 3, 3, 5, 4, t=t)
    factors = [rand(t, o, r), rand(t, r), rand(t, i, r), rand(t, o, r), rand(t, r), rand(t, i, r)]
    leaves = [f.clone().requires_grad_() for f in factors]
    gamma, beta = LowRank(*leaves[:3]), LowRank(*leaves[3:])
    y = ops.modulated_conv2d(x, wn, gamma, beta, c, task_ids=tid, padding=1, backend="triton")
    leaves64 = [f.double().requires_grad_() for f in factors]
    g64, b64 = LowRank(*leaves64[:3]).dense(), LowRank(*leaves64[3:]).dense()
    want = formulas.conv2d(x, wn.double(), g64, b64, c.double(), tid, padding=(1, 1))
    assert_near(y, want, what="forward")
    grad = torch.randn_like(want)
    for name, got, exp in zip(
        "u s v bu bs bv".split(),
        torch.autograd.grad(y, leaves, grad.float()),
        torch.autograd.grad(want, leaves64, grad),
    ):
        assert_near(got, exp, what=name)


def test_opcheck_conv_triton():
    x, wn, g, b, c, tid = conv_case(2, 3, 4, 3, 3, 5, 5, t=3)
    args = (x.requires_grad_(), wn, g.requires_grad_(), b.requires_grad_(), c.requires_grad_(), tid,
            [1, 1], [1, 1], [1, 1])
    with ops.use_backend("triton"):
        torch.library.opcheck(modulated_conv2d_op, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---------------------------------------------------------------------------------------------
# mFiLM linear and the modulated weight
# ---------------------------------------------------------------------------------------------
def check_linear(x, weight_norm, gamma, beta, bias, task_ids, tol=2e-4):
    leaves = [t.detach().clone().requires_grad_() for t in (x, gamma, beta) + ((bias,) if bias is not None else ())]
    c_ = leaves[3] if bias is not None else None
    y = ops.modulated_linear(leaves[0], weight_norm, leaves[1], leaves[2], c_, task_ids=task_ids, backend="triton")
    exp_leaves = [t.detach().double().requires_grad_() for t in leaves]
    c64 = exp_leaves[3] if bias is not None else None
    expected = formulas.linear(exp_leaves[0], weight_norm.double(), exp_leaves[1], exp_leaves[2], c64, task_ids)
    assert_near(y, expected, tol, "forward")
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(y, leaves, grad.to(y.dtype))
    want = torch.autograd.grad(expected, exp_leaves, grad)
    for name, g, e in zip(["dx", "dgamma", "dbeta", "dbias"], got, want):
        assert_near(g, e, tol, name)


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("sizes", [(5, 7, 3), (37, 21, 19)])
def test_linear_single_and_mixed(sizes, mixed):
    torch.manual_seed(sum(sizes) + mixed)
    n, i, o = sizes
    t = 4 if mixed else None
    lead = (t,) if mixed else ()
    task_ids = torch.tensor([3, 0] * (n // 2) + [3] * (n % 2), device=DEVICE) if mixed else None  # 1, 2 absent
    check_linear(rand(n, i), ops.normalize_weight(rand(o, i))[0], rand(*lead, o), rand(*lead, o),
                 rand(*lead, o), task_ids)


def test_linear_more_tasks_than_samples_no_bias_and_shared_bias():
    torch.manual_seed(11)
    wn = ops.normalize_weight(rand(6, 9))[0]
    task_ids = torch.tensor([7, 2], device=DEVICE)
    check_linear(rand(2, 9), wn, rand(9, 6), rand(9, 6), None, task_ids)
    check_linear(rand(2, 9), wn, rand(9, 6), rand(9, 6), rand(6), task_ids)


def test_linear_inner_dimensions_and_float16():
    torch.manual_seed(12)
    x, wn = rand(3, 2, 5), ops.normalize_weight(rand(4, 5))[0]
    g, b, tid = rand(2, 4), rand(2, 4), torch.tensor([1, 0, 1], device=DEVICE)
    y = ops.modulated_linear(x, wn, g, b, task_ids=tid, backend="triton")
    want = ops.modulated_linear(x, wn, g, b, task_ids=tid, backend="reference")
    assert_near(y, want, what="inner dims")
    check_linear(rand(6, 5).half(), wn.half(), rand(2, 4).half(), rand(2, 4).half(), rand(2, 4).half(),
                 torch.tensor([1, 0, 0, 1, 1, 1], device=DEVICE), tol=1e-2)


def test_opcheck_linear_triton():
    x, wn, g, b, c = rand(5, 7), rand(3, 7), rand(2, 3), rand(2, 3), rand(2, 3)
    tid = torch.tensor([1, 0, 1, 1, 0], device=DEVICE)
    args = (x.requires_grad_(), wn, g.requires_grad_(), b.requires_grad_(), c.requires_grad_(), tid)
    with ops.use_backend("triton"):
        torch.library.opcheck(modulated_linear_op, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("stacked", [False, True])
def test_madafm_weight_and_backward(stacked):
    torch.manual_seed(13)
    lead = (3,) if stacked else ()
    wn = rand(5, 4, 3, 2)
    g, b = rand(*lead, 5, 4).requires_grad_(), rand(*lead, 5, 4).requires_grad_()
    w = ops.madafm_weight(wn, g, b, backend="triton")
    g64, b64 = g.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    want = g64[..., None, None] * wn.double() + b64[..., None, None]
    assert_near(w, want, what="weight")
    grad = torch.randn_like(want)
    for name, got, exp in zip(["dgamma", "dbeta"], torch.autograd.grad(w, [g, b], grad.float()),
                              torch.autograd.grad(want, [g64, b64], grad)):
        assert_near(got, exp, what=name)
    # the mFiLM view: rows of a linear weight
    wl, gl, bl = rand(5, 7), rand(*lead, 5), rand(*lead, 5)
    assert_near(ops.madafm_weight(wl, gl, bl, backend="triton"), gl[..., None] * wl + bl[..., None], what="linear")


def test_torch_compile_cpu_still_works_with_the_interpreter_variable():
    # conftest sets TRITON_INTERPRET=1 on CPU machines: inductor's C++ backend must not care
    if HAS_GPU:
        pytest.skip("checks the CPU/interpreter setting")
    f = torch.compile(lambda a, b: torch.relu(a @ b) + 1.0)
    a = torch.randn(8, 8)
    torch.testing.assert_close(f(a, a), torch.relu(a @ a) + 1.0)


def run_compiled_mode(module: str, *args: str, timeout: int):
    """``python -m module args`` with TRITON_INTERPRET=0 (Triton's compiled mode, as on a GPU), from
    the repository root; asserts it exits 0 and returns the finished process."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


KERNELS_DIR = pathlib.Path(__file__).resolve().parents[1] / "gmem_kernels"


def _kernel_names() -> list[str]:
    """The @triton.jit kernels gmem_kernels launches (``*_kernel``; helpers are device functions)."""
    import re

    return sorted({m for f in KERNELS_DIR.glob("*.py")
                   for m in re.findall(r"^def (_?\w+_kernel)\(", f.read_text(), re.M)})


def _kernel_ops() -> set[str]:
    """Every ``gmem::triton_`` op gmem_kernels registers (one per kernel launch)."""
    import re

    return {m for f in KERNELS_DIR.glob("*.py")
            for m in re.findall(r'kernel_op\("(gmem::triton_\w+)"\)', f.read_text())}


def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter runs the kernels' Python, not Triton's compiler: compile each kernel (one
    # configuration, bf16) for sm_90 with the bundled ptxas to catch what only the compiler rejects.
    if HAS_GPU:
        pytest.skip("on a GPU the other tests compile and run every kernel")
    proc = run_compiled_mode("gmem_kernels.compile_check", "--dtypes", "bf16", timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert lines and all(line.startswith("ok ") for line in lines), proc.stdout
    # every launched kernel of gmem_kernels has a compile case (a new kernel cannot escape the check)
    source = (KERNELS_DIR / "compile_check.py").read_text()
    missing = [k for k in _kernel_names() if f".{k})" not in source]
    assert not missing, missing
    assert len(lines) >= len(_kernel_names())


# ---------------------------------------------------------------------------------------------
# GPU only: real shapes and bfloat16
# ---------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (real shapes are too slow for the interpreter)")


@gpu
@pytest.mark.parametrize("mixed", [False, True])
def test_gpu_conv_real_shapes(mixed):
    torch.manual_seed(20)
    check_conv(*conv_case(16, 64, 128, 3, 3, 32, 32, t=8 if mixed else None), tol=2e-4, padding=1)
    check_conv(*conv_case(8, 256, 64, 1, 1, 16, 16, t=64 if mixed else None), tol=2e-4)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_conv_and_linear_half_precision(dtype):
    torch.manual_seed(21)
    x, wn, g, b, c, tid = conv_case(8, 64, 64, 3, 3, 16, 16, t=4)
    check_conv(*(t.to(dtype) for t in (x, wn, g, b, c)), tid, tol=3e-2, padding=1)
    wl = ops.normalize_weight(rand(256, 512))[0]
    tid = torch.randint(0, 4, (64,), device=DEVICE)
    check_linear(rand(64, 512).to(dtype), wl.to(dtype), rand(4, 256).to(dtype), rand(4, 256).to(dtype),
                 rand(4, 256).to(dtype), tid, tol=3e-2)


@gpu
def test_gpu_tf32_follows_torch_setting():
    torch.manual_seed(22)
    x, wn, g, b, c, _ = conv_case(4, 128, 128, 3, 3, 16, 16)
    exact = ops.modulated_conv2d(x, wn, g, b, c, padding=1, backend="triton")
    set_tf32(True)  # restored by the autouse fixture
    fast = ops.modulated_conv2d(x, wn, g, b, c, padding=1, backend="triton")
    want = formulas.conv2d(x, wn.double(), g.double(), b.double(), c.double(), padding=(1, 1))
    assert_near(exact, want, 2e-4, "ieee")
    assert_near(fast, want, 5e-3, "tf32")


def test_lowrank_takes_the_factored_kernel_path(monkeypatch):
    # the triton backend receives the factors (never a dense style matrix) for LowRank gamma/beta
    backend = ops.get_backend("triton")
    assert backend.supports_lowrank
    seen = []
    original = type(backend).modulated_conv2d_lowrank
    monkeypatch.setattr(type(backend), "modulated_conv2d_lowrank",
                        lambda self, *a, **k: seen.append(1) or original(self, *a, **k))
    x, wn, _, _, _, _ = conv_case(2, 3, 4, 3, 3, 4, 4)
    lr = lambda: LowRank(rand(4, 2), rand(2), rand(3, 2))  # noqa: E731
    y = ops.modulated_conv2d(x, wn, lr(), lr(), backend="triton", padding=1)
    assert seen and y.shape == (2, 4, 4, 4)


@pytest.mark.parametrize("shared_base", [False, True])
def test_conv_lowrank_single_task_and_shared_knowledge_base(shared_base):
    torch.manual_seed(14)
    o, i = 5, 4
    x, wn, _, _, c, _ = conv_case(2, i, o, 3, 2, 5, 5)
    if shared_base:  # a shared base L diag(lam) R^T plus each task's own term, 3 tasks stacked
        t, tid = 3, torch.tensor([2, 0], device=DEVICE)
        factors = [rand(o, 2), rand(2), rand(i, 2), rand(t, o, 1), rand(t, 1), rand(t, i, 1)]
        c = rand(t, o)
    else:
        tid, factors = None, [rand(o, 3), rand(3), rand(i, 3)]
    leaves = [f.clone().requires_grad_() for f in factors]
    leaves64 = [f.double().requires_grad_() for f in factors]

    def styles(fs):
        if shared_base:
            return LowRank.concat(LowRank(*fs[:3]), LowRank(*fs[3:]))
        return LowRank(*fs)

    lead = (3,) if shared_base else ()
    gamma, beta = styles(leaves), LowRank(rand(*lead, o, 2), rand(*lead, 2), rand(*lead, i, 2))
    y = ops.modulated_conv2d(x, wn, gamma, beta, c, task_ids=tid, padding=(1, 0), backend="triton")
    want = formulas.conv2d(x, wn.double(), styles(leaves64).dense(), beta.dense().double(), c.double(), tid,
                           padding=(1, 0))
    assert_near(y, want, what="forward")
    grad = torch.randn_like(want)
    for k, got, exp in zip(range(6), torch.autograd.grad(y, leaves, grad.float()),
                           torch.autograd.grad(want, leaves64, grad)):
        assert_near(got, exp, what=f"factor {k}")


def test_conv_lowrank_double_backward_uses_the_formulas():
    # R1-style penalty: gradient of a gradient through the low-rank op (reference formulas path)
    torch.manual_seed(15)
    x, wn, _, _, _, _ = conv_case(2, 3, 4, 3, 3, 4, 4)
    u = rand(4, 2).requires_grad_()
    gamma, beta = LowRank(u, rand(2), rand(3, 2)), LowRank(rand(4, 1), rand(1), rand(3, 1))
    x = x.requires_grad_()
    y = ops.modulated_conv2d(x, wn, gamma, beta, padding=1, backend="triton")
    (dx,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
    (du,) = torch.autograd.grad(dx.square().sum(), [u])
    x64, u64 = x.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    y64 = formulas.conv2d(x64, wn.double(), LowRank(u64, gamma.s.double(), gamma.v.double()).dense(),
                          beta.dense().double(), None, None, padding=(1, 1))
    (dx64,) = torch.autograd.grad(y64.square().sum(), [x64], create_graph=True)
    (du64,) = torch.autograd.grad(dx64.square().sum(), [u64])
    assert_near(du, du64, 1e-3, "double backward")


def test_opcheck_conv_lowrank_triton():
    x, wn, _, _, c, tid = conv_case(2, 3, 4, 3, 3, 4, 4, t=3)
    fac = [rand(3, 4, 2), rand(3, 2), rand(3, 3, 2), rand(3, 4, 1), rand(3, 1), rand(3, 3, 1)]
    args = (x.requires_grad_(), wn, *(f.requires_grad_() for f in fac), c.requires_grad_(), tid,
            [1, 1], [1, 1], [1, 1])
    with ops.use_backend("triton"):
        torch.library.opcheck(modulated_conv2d_lowrank_op, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_converted_model_with_the_triton_backend_matches_reference():
    # through gmem.nn: a converted conv+linear net, mixed-task batch, outputs and style gradients
    import gmem.nn as gnn

    torch.manual_seed(16)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.LeakyReLU(0.2), torch.nn.Flatten(), torch.nn.Linear(5 * 4 * 4, 3)
    ).to(DEVICE)
    gnn.convert(net)
    for name in ("a", "b"):
        gnn.add_task(net, name)
        with torch.no_grad():  # move the new task's styles away from the source
            for p in gnn.style_parameters(net, name):
                p.add_(0.1 * torch.randn_like(p))
    x = rand(4, 3, 4, 4)
    task_ids = torch.tensor([2, 0, 2, 1], device=DEVICE)
    results = {}
    for backend in ("reference", "triton"):
        gnn.set_backend(net, backend)
        with gnn.use_tasks(net, task_ids):
            y = net(x)
        params = gnn.style_parameters(net, "a")
        results[backend] = (y, torch.autograd.grad(y.square().sum(), params))
    gnn.set_backend(net, "auto")
    (y_ref, g_ref), (y_tri, g_tri) = results["reference"], results["triton"]
    assert_near(y_tri, y_ref, what="output")
    for k, (got, want) in enumerate(zip(g_tri, g_ref)):
        assert_near(got, want, 1e-3, f"style parameter {k}")


def test_lowrank_bad_input_is_named_on_the_factored_path():
    x, wn, _, _, _, _ = conv_case(2, 3, 4, 3, 3, 4, 4)
    good = lambda t: LowRank(rand(t, 4, 2), rand(t, 2), rand(t, 3, 2))  # noqa: E731
    wrong_o = LowRank(rand(2, 5, 2), rand(2, 2), rand(2, 3, 2))
    with pytest.raises(ValueError, match="gamma"):
        ops.modulated_conv2d(x, wn, wrong_o, good(2), task_ids=torch.tensor([0, 1], device=DEVICE), backend="triton")
    with pytest.raises(IndexError, match="task_ids"):
        ops.modulated_conv2d(x, wn, good(2), good(2), task_ids=torch.tensor([0, 2], device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="task_ids"):
        ops.modulated_conv2d(x, wn, good(2), good(2), backend="triton")


# ---------------------------------------------------------------------------------------------
# torch.compile: every launch is a gmem::triton_ op (torch.library.triton_op + wrap_triton)
# ---------------------------------------------------------------------------------------------
def _called(graphs) -> set:
    """Targets of every call in the captured graphs and their subgraphs (autograd.Function bodies)."""
    names = set()
    for gm in graphs:
        for module in gm.modules():
            if isinstance(module, torch.fx.GraphModule):
                names |= {str(node.target) for node in module.graph.nodes if node.op == "call_function"}
    return names


def _compiled(fn, graphs, aot_graphs=None):
    """``torch.compile(fn, fullgraph=True)`` on aot_eager, recording the dynamo graphs (and in
    ``aot_graphs`` the forward and backward graphs AOT autograd traces through the ops' autograd)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def record(gm, example_inputs):
        (aot_graphs if aot_graphs is not None else []).append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_autograd(fw_compiler=record, bw_compiler=record)(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


def _assert_same(got, want, what, tol=1e-6):
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"{what}[{k}]"
        elif isinstance(w, tuple):
            _assert_same(g, w, f"{what}[{k}]", tol)
        else:
            assert_near(g, w, tol, f"{what}[{k}] compiled vs eager")


def test_backend_is_traceable_and_kernel_ops_are_registered():
    from gmem_kernels import conv, linear, weight

    assert ops.get_backend("triton").traceable
    for fn in (conv._conv_forward_op, conv._conv_input_grad_op, conv._conv_style_grad_op, conv._conv_bias_grad_op,
               linear._linear_forward_op, linear._linear_input_grad_op, linear._linear_style_grad_op,
               weight.madafm_weight, weight.madafm_weight_backward):
        assert fn.op._qualname.startswith("gmem::triton_")


def test_compile_backend_methods_fullgraph_matches_eager():
    # dynamo traces the host code (device-side task grouping included) with no graph break and
    # records one gmem::triton_ op per kernel launch; numbers equal eager and the formulas
    torch.manual_seed(30)
    backend = ops.get_backend("triton")
    x, wn, g, b, c, tid = conv_case(3, 4, 5, 3, 3, 4, 4, t=4, task_ids=torch.tensor([3, 1, 3], device=DEVICE))
    fac = (rand(4, 5, 2), rand(4, 2), rand(4, 4, 2))
    xl, wl = rand(5, 6), ops.normalize_weight(rand(3, 6))[0]
    gl, bl, cl, tl_ids = rand(2, 3), rand(2, 3), rand(2, 3), torch.tensor([1, 1, 0, 1, 0], device=DEVICE)
    conv = ([1, 1], [1, 1], [1, 1])

    def program(x, g, b, c, u, s, v, xl, gl, bl, cl):
        y = backend.modulated_conv2d(x, wn, g, b, c, tid, *conv)
        dy = backend.modulated_conv2d_backward(y, x, wn, g, b, c, tid, *conv, [True] * 4)
        y1 = backend.modulated_conv2d(x, wn, g[0], b[0], c[0], None, *conv)  # single task
        lr = (u, s, v)
        y_lr = backend.modulated_conv2d_lowrank(x, wn, lr, lr, c, tid, *conv)
        d_lr = backend.modulated_conv2d_lowrank_backward(y_lr, x, wn, lr, lr, c, tid, *conv, [True, True, False, True])
        z = backend.modulated_linear(xl, wl, gl, bl, cl, tl_ids)
        dz = backend.modulated_linear_backward(z, xl, wl, gl, bl, cl, tl_ids, [True] * 4)
        w = backend.madafm_weight(wn, g, b)
        return (y, dy, y1, y_lr, d_lr, z, dz, w, backend.madafm_weight_backward(w, wn))

    args = (x, g, b, c, *fac, xl, gl, bl, cl)
    want = program(*args)
    graphs = []
    got = _compiled(program, graphs)(*args)
    _assert_same(got, want, "program")
    called = _called(graphs)
    for name in ("conv2d_forward", "conv2d_input_grad", "conv2d_style_grad", "conv2d_bias_grad", "linear_forward",
                 "linear_input_grad", "linear_style_grad", "madafm_weight", "madafm_weight_backward"):
        assert f"gmem.triton_{name}.default" in called, name
    assert not any(n.startswith("gmem.") and not n.startswith("gmem.triton_") for n in called)  # no opaque op
    # and the eager numbers are right (the formula in float64)
    want64 = formulas.conv2d(x.double(), wn.double(), g.double(), b.double(), c.double(), tid, padding=(1, 1))
    assert_near(got[0], want64, what="compiled forward")


@pytest.mark.parametrize("lowrank", [False, True])
def test_compile_public_conv_forward_backward_matches_eager(lowrank):
    # the public op under torch.compile is the one gmem:: op in dynamo's graph; AOT autograd traces
    # its autograd with the backend chosen around the call into the Triton kernels, forward and
    # backward, mixed tasks (one absent)
    torch.manual_seed(31 + lowrank)
    tid = torch.tensor([2, 0, 2], device=DEVICE)
    x, wn, g, b, c, _ = conv_case(3, 4, 5, 3, 3, 4, 4, t=3, task_ids=tid)
    if lowrank:
        leaves = [x, rand(3, 5, 2), rand(3, 2), rand(3, 4, 2), rand(3, 5, 1), rand(3, 1), rand(3, 4, 1), c]
        styles = lambda p: (LowRank(*p[1:4]), LowRank(*p[4:7]), p[7])  # noqa: E731
    else:
        leaves = [x, g, b, c]
        styles = lambda p: tuple(p[1:])  # noqa: E731

    def forward(*params):
        gamma, beta, bias = styles(params)
        return ops.modulated_conv2d(params[0], wn, gamma, beta, bias, task_ids=tid, padding=1, backend="triton")

    def run(fn):
        params = [p.detach().clone().requires_grad_() for p in leaves]
        with ops.use_backend("triton"):  # a backend= inside compiled code cannot choose (gmem.ops.backends)
            y = fn(*params)
            return (y, *torch.autograd.grad(y.square().sum(), params))

    graphs, aot_graphs = [], []
    want, got = run(forward), run(_compiled(forward, graphs, aot_graphs))
    _assert_same(got, want, "conv")
    op = "gmem.modulated_conv2d_lowrank.default" if lowrank else "gmem.modulated_conv2d.default"
    assert op in _called(graphs)  # the one registered op
    called = _called(aot_graphs)
    assert {"gmem.triton_conv2d_forward.default", "gmem.triton_conv2d_input_grad.default",
            "gmem.triton_conv2d_style_grad.default", "gmem.triton_conv2d_bias_grad.default"} <= called
    # its Triton kernels, traced (no public gmem:: op left)
    assert not any(n.startswith("gmem.") and not n.startswith("gmem.triton_") for n in called)


def test_compile_public_conv_with_inductor_matches_eager():
    # inductor too (on the CPU the interpreter's ops are extern calls; on a GPU, triton kernels)
    torch.manual_seed(34)
    tid = torch.tensor([1, 0, 1], device=DEVICE)
    x, wn, g, b, c, _ = conv_case(3, 3, 4, 3, 3, 4, 4, t=2, task_ids=tid)

    def forward(x, g, b, c):
        return ops.modulated_conv2d(x, wn, g, b, c, task_ids=tid, padding=1, backend="triton")

    def run(fn):
        params = [p.detach().clone().requires_grad_() for p in (x, g, b, c)]
        with ops.use_backend("triton"):
            y = fn(*params)
            return (y, *torch.autograd.grad(y.square().sum(), params))

    torch._dynamo.reset()
    # no on-disk compile caches: they key the graph (the gmem:: op), not the backend its Autograd
    # kernel chose when it was traced, nor gmem's code (see docs/design.md, section 7)
    with torch._functorch.config.patch(enable_autograd_cache=False), \
            torch._inductor.config.patch(fx_graph_cache=False):
        compiled = run(torch.compile(forward, fullgraph=True, backend="inductor"))
    _assert_same(compiled, run(forward), "inductor", 1e-5)


def test_compile_public_linear_and_weight_forward_backward_match_eager():
    torch.manual_seed(33)
    tid = torch.tensor([1, 0, 1, 1], device=DEVICE)
    wl, wn = ops.normalize_weight(rand(3, 5))[0], rand(3, 2, 3, 3)
    leaves = [rand(4, 5), rand(2, 3), rand(2, 3), rand(2, 3), rand(2, 3, 2), rand(2, 3, 2)]

    def forward(x, g, b, c, gw, bw):
        z = ops.modulated_linear(x, wl, g, b, c, task_ids=tid, backend="triton")
        return z.square().sum() + ops.madafm_weight(wn, gw, bw, backend="triton").square().sum()

    def run(fn):
        params = [p.detach().clone().requires_grad_() for p in leaves]
        with ops.use_backend("triton"):
            y = fn(*params)
            return (y, *torch.autograd.grad(y, params))

    graphs, aot_graphs = [], []
    want, got = run(forward), run(_compiled(forward, graphs, aot_graphs))
    _assert_same(got, want, "linear+weight")
    assert {"gmem.modulated_linear.default", "gmem.madafm_weight.default"} <= _called(graphs)
    called = _called(aot_graphs)
    assert {"gmem.triton_linear_forward.default", "gmem.triton_linear_input_grad.default",
            "gmem.triton_linear_style_grad.default", "gmem.triton_madafm_weight.default",
            "gmem.triton_madafm_weight_backward.default"} <= called


def test_opcheck_kernel_ops():
    from gmem_kernels import conv, group_by_task, linear

    x, wn, g, b, c, tid = conv_case(3, 4, 5, 3, 3, 4, 4, t=3, task_ids=torch.tensor([2, 0, 2], device=DEVICE))
    groups = group_by_task(tid, 3)
    seg = (groups.order, groups.start, groups.count, groups.task)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(conv._conv_forward_op.op, (x, wn, [g], [b], c, *seg, [1, 1], [1, 1], [1, 1]),
                          test_utils=checks)
    torch.library.opcheck(conv._conv_style_grad_op.op, (x, rand(3, 5, 4, 4), wn, *seg[:3], [1, 1], [1, 1], [1, 1]),
                          test_utils=checks)
    lg = group_by_task(torch.tensor([1, 0, 1], device=DEVICE), 2)
    torch.library.opcheck(linear._linear_style_grad_op.op, (rand(3, 4), rand(3, 2), rand(2, 4), lg.order, lg.start,
                                                            lg.count), test_utils=checks)


def test_kernel_ops_trace_into_triton_launches_without_a_gpu():
    # The interpreter's kernels cannot be traced by torch (its wrap_triton hands them back as they
    # are), so check the compiled-mode registration (TRITON_INTERPRET=0, as on a GPU) in a
    # subprocess: dynamo records gmem::triton_ ops, AOT autograd decomposes them into triton
    # kernel HOP nodes (stopping before anything would run).
    if HAS_GPU:
        pytest.skip("on a GPU the compile tests above run the traced kernels")
    import ast
    import re

    proc = run_compiled_mode("gmem_kernels.trace_check", timeout=300)
    dynamo = ast.literal_eval(re.search(r"dynamo graph: triton launch ops (\{.*\})", proc.stdout).group(1))
    launches = int(re.search(r"triton kernel launches (\d+),", proc.stdout).group(1))
    assert set(dynamo) == _kernel_ops(), proc.stdout  # the program calls every op, each traced
    assert launches == sum(dynamo.values()), proc.stdout  # and each op call became one kernel launch
