"""Every convolution kind gmem modulates: Conv1d/2d/3d, ConvTranspose1d/2d/3d, grouped and depthwise.

The op ``gmem.ops.modulated_conv`` against an independent float64 formula (tests/formulas.py), its
gradients, fakes, compile and autocast; the layers against the ``torch.nn`` modules they replace.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from formulas import conv_nd
from torch import nn

import gmem.nn as gnn
from gmem import ops
from gmem.ops import convolution

# (name, module factory, input shape): tiny shapes, odd sizes, every kind with and without groups
LAYERS = [
    ("conv1d", lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (3, 4, 9)),
    ("conv1d-grouped-same-reflect", lambda: nn.Conv1d(4, 6, 4, padding="same", groups=2, padding_mode="reflect"),
     (3, 4, 7)),
    ("conv2d-depthwise", lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (3, 4, 5, 6)),
    ("conv2d-grouped-same-even", lambda: nn.Conv2d(4, 6, (2, 3), padding="same", groups=2, bias=False), (3, 4, 5, 4)),
    ("conv2d-same-even", lambda: nn.Conv2d(3, 5, 2, padding="same"), (3, 3, 5, 4)),
    ("conv3d", lambda: nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1)), (2, 2, 3, 5, 4)),
    ("conv3d-grouped-circular", lambda: nn.Conv3d(4, 4, 3, padding=1, groups=2, padding_mode="circular"),
     (2, 4, 3, 4, 3)),
    ("convT1d", lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1), (3, 4, 5)),
    ("convT2d", lambda: nn.ConvTranspose2d(4, 6, 2, stride=2), (3, 4, 3, 4)),
    ("convT2d-grouped", lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2,
                                                   dilation=2, bias=False), (3, 4, 3, 4)),
    ("convT3d-grouped", lambda: nn.ConvTranspose3d(4, 2, 2, stride=2, groups=2), (2, 4, 2, 3, 2)),
]
IDS = [case[0] for case in LAYERS]


def _model(factory, dtype=torch.float64, tasks=("a", "b")):
    """``(plain layer, converted Sequential)`` with tasks whose styles differ from the source."""
    torch.manual_seed(0)
    layer = factory().to(dtype)
    model = nn.Sequential(copy.deepcopy(layer))
    converted = gnn.convert(model)
    assert converted == ["0"] and converted.skipped == []
    for k, name in enumerate(tasks):
        gnn.add_task(model, name)
        with torch.no_grad():
            for p in gnn.style_parameters(model, name):
                p.add_(torch.randn_like(p) * 0.3 * (k + 1))
    return layer, model


@pytest.mark.parametrize("name, factory, shape", LAYERS, ids=IDS)
def test_source_is_the_torch_module_bit_for_bit(name, factory, shape):
    layer, model = _model(factory, torch.float32)
    x = torch.randn(shape)
    expected = layer(x)
    assert torch.equal(model(x), expected)
    with gnn.use_task(model, "source"):
        assert torch.equal(model(x), expected)
    with gnn.use_task(model, "a"):
        assert not torch.allclose(model(x), expected)
    # training task "a" leaves the source as it was
    opt = torch.optim.SGD(gnn.trainable_parameters(model, "a"), lr=0.1)
    with gnn.use_task(model, "a"):
        model(x).square().mean().backward()
    opt.step()
    assert torch.equal(model(x), expected)
    assert isinstance(model[0], gnn.MODULATED_LAYERS[type(layer)])


@pytest.mark.parametrize("name, factory, shape", LAYERS, ids=IDS)
def test_task_equals_formula_and_plain_module(name, factory, shape):
    layer, model = _model(factory)
    m = model[0]
    x = torch.randn(shape, dtype=torch.float64)
    gamma, beta, delta = m.dense_style(2)
    with gnn.use_task(model, "b"):
        out = model(x)
    if m._pre_pad is None:  # the formula pads with zeros; padding modes are checked through the plain module
        expected = conv_nd(x, m.weight_norm, gamma, beta, m.total_bias(delta), stride=m.stride, padding=m._op_padding,
                           dilation=m.dilation, groups=m.groups, transposed=m.transposed,
                           output_padding=m.output_padding)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    plain = m.plain_module(m.modulated_weight(gamma, beta), m.total_bias(delta))
    assert type(plain) is type(layer) and plain.bias is not None  # a task's bias delta makes a bias
    torch.testing.assert_close(out, plain(x), rtol=1e-10, atol=1e-10)
    # the source's plain module is the original layer
    source = m.plain_module(m.weight, m.bias)
    assert torch.equal(source(x), layer(x)) and (source.bias is None) == (layer.bias is None)


@pytest.mark.parametrize("name, factory, shape", LAYERS, ids=IDS)
def test_mixed_batch_equals_per_sample_calls(name, factory, shape):
    _, model = _model(factory)
    x = torch.randn(shape, dtype=torch.float64)
    ids = torch.tensor([2, 0, 1][: shape[0]] if shape[0] < 3 else [2, 0, 1] + [1] * (shape[0] - 3))
    with gnn.use_tasks(model, ids):
        mixed = model(x)
    for s, t in enumerate(ids.tolist()):
        with gnn.use_task(model, t):
            torch.testing.assert_close(mixed[s:s + 1], model(x[s:s + 1]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, factory, shape", LAYERS, ids=IDS)
def test_meta_model_runs_mixed_batches(name, factory, shape):
    _, model = _model(factory, torch.float32)
    x = torch.randn(shape)
    ids = torch.arange(shape[0]) % 3
    with gnn.use_tasks(model, ids):
        real = model(x)
    meta = copy.deepcopy(model).to("meta")
    xm = x.to("meta").requires_grad_()
    for task_ids in (ids, ids.to("meta")):
        with gnn.use_tasks(meta, task_ids):
            out = meta(xm)
        assert out.device.type == "meta" and out.shape == real.shape
        out.sum().backward()
        assert xm.grad.shape == x.shape


def test_meta_model_with_dense_conv2d_and_linear():
    """The layers on the fused ops (Conv2d groups=1, Linear): mixed batches on meta (no unique, no range read)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5))
    gnn.convert(model)
    gnn.add_task(model, "a")
    gnn.add_task(model, "b")
    x = torch.randn(3, 3, 4, 4)
    with gnn.use_tasks(model, [0, 2, 1]):
        real = model(x)
    meta = model.to("meta")
    with gnn.use_tasks(meta, torch.tensor([0, 2, 1], device="meta")):
        out = meta(x.to("meta"))
    assert out.shape == real.shape and out.device.type == "meta"
    out.sum().backward()


def test_lowrank_styles_equal_dense():
    torch.manual_seed(1)
    wn = torch.randn(6, 2, 3, 3, 2, dtype=torch.float64)  # grouped 3-D conv, groups=2: C_in = 4
    x = torch.randn(3, 4, 4, 5, 4, dtype=torch.float64)
    u, s, v = torch.randn(3, 6, 2, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64), torch.randn(
        3, 2, 2, dtype=torch.float64)
    gamma, beta = ops.LowRank(u, s, v), ops.LowRank(u * 0.5, s, v.flip(0))
    ids = torch.tensor([1, 0, 2])
    out = ops.modulated_conv(x, wn, gamma, beta, task_ids=ids, groups=2, padding=1)
    dense = ops.modulated_conv(x, wn, gamma.dense(), beta.dense(), task_ids=ids, groups=2, padding=1)
    torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)


def _op_case(rank, transposed, groups, mixed, dtype=torch.float64, seed=0):
    """Random odd-shaped arguments of ``modulated_conv``: ``(args, kwargs)``."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
    c_in, c_out = 2 * groups, 3 * groups
    kernel = (3, 2, 3)[:rank]
    a, b = (c_in, c_out // groups) if transposed else (c_out, c_in // groups)
    wn = rand(a, b, *kernel)
    t = 3
    style = (t, a, b) if mixed else (a, b)
    gamma, beta = rand(*style), rand(*style)
    bias = rand(t, c_out) if mixed else rand(c_out)
    x = rand(3, c_in, *(5, 4, 3)[:rank])
    kwargs = dict(stride=2, padding=1, dilation=(1, 2, 1)[:rank], groups=groups, transposed=transposed,
                  output_padding=1 if transposed else 0, task_ids=torch.tensor([2, 0, 2]) if mixed else None)
    return (x, wn, gamma, beta, bias), kwargs


OP_CASES = [(r, tr, gr, mx) for r in (1, 2, 3) for tr in (False, True) for gr in (1, 2) for mx in (False, True)]


@pytest.mark.parametrize("rank, transposed, groups, mixed", OP_CASES)
def test_op_float64_against_formula(rank, transposed, groups, mixed):
    args, kwargs = _op_case(rank, transposed, groups, mixed, seed=rank * 7 + groups)
    out = ops.modulated_conv(*args, **kwargs)
    expected = conv_nd(*args, **kwargs)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("rank, transposed, groups", [(1, False, 2), (2, True, 2), (3, True, 1), (1, True, 1)])
def test_op_gradcheck_and_double_backward(rank, transposed, groups):
    (x, wn, gamma, beta, bias), kwargs = _op_case(rank, transposed, groups, mixed=True)
    x = x[(slice(None), slice(None)) + (slice(0, 3),) * (rank - 1) + (slice(0, 2),)]  # small: gradgradcheck is slow
    x, gamma, beta, bias = (t.clone().requires_grad_() for t in (x, gamma, beta, bias))
    f = lambda x, gamma, beta, bias: ops.modulated_conv(x, wn, gamma, beta, bias, **kwargs)
    assert torch.autograd.gradcheck(f, (x, gamma, beta, bias))
    if rank < 3:
        assert torch.autograd.gradgradcheck(f, (x, gamma, beta, bias))
    # weight_norm never gets a gradient
    wn_leaf = wn.clone().requires_grad_()
    ops.modulated_conv(x, wn_leaf, gamma, beta, bias, **kwargs).sum().backward()
    assert wn_leaf.grad is None


@pytest.mark.parametrize("transposed", [False, True])
def test_gathered_and_grouped_mixed_paths_agree(transposed):
    (x, wn, gamma, beta, bias), kwargs = _op_case(2, transposed, 2, mixed=True)
    conv_args = ([2, 2], [1, 1], list(kwargs["dilation"]), transposed, [kwargs["output_padding"]] * 2, 2)
    ids = torch.tensor([2, 0, 2])
    grouped = convolution._mixed_grouped(x, wn, gamma, beta, bias, ids, *conv_args)
    gathered = convolution._mixed_gathered(x, wn, gamma, beta, bias, ids, *conv_args)
    torch.testing.assert_close(grouped, gathered, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("transposed, mixed", [(False, False), (False, True), (True, True)])
def test_opcheck(transposed, mixed):
    (x, wn, gamma, beta, bias), kwargs = _op_case(1, transposed, 2, mixed, dtype=torch.float32)
    args = (x.requires_grad_(), wn, gamma.requires_grad_(), beta.requires_grad_(), bias, kwargs["task_ids"],
            [2], [1], [1], transposed, [kwargs["output_padding"]], 2)
    torch.library.opcheck(torch.ops.gmem.modulated_conv.default, args)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args, kwargs = _op_case(3, True, 2, mixed=True, dtype=torch.float32)
    real = ops.modulated_conv(*args, **kwargs)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) for a in args]
        kwargs["task_ids"] = mode.from_tensor(kwargs["task_ids"])
        out = ops.modulated_conv(*fake_args, **kwargs)
    assert out.shape == real.shape


@pytest.mark.parametrize("name, factory, shape", [LAYERS[1], LAYERS[9]], ids=[IDS[1], IDS[9]])
def test_compile_equals_eager(name, factory, shape):
    torch._dynamo.reset()  # each test compiles nn.Sequential.forward afresh (no recompiles with dynamic shapes)
    _, model = _model(factory, torch.float32)
    x = torch.randn(shape)
    ids = torch.arange(shape[0]) % 3
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for select in (lambda: gnn.use_task(model, "a"), lambda: gnn.use_tasks(model, ids)):
        with select():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_compile_inductor_mixed_transposed():
    torch._dynamo.reset()
    _, model = _model(LAYERS[8][1], torch.float32)
    x = torch.randn(LAYERS[8][2])
    ids = torch.tensor([1, 2, 0])
    with gnn.use_tasks(model, ids):
        expected = model(x)
        torch.testing.assert_close(torch.compile(model)(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, factory, shape", [LAYERS[0], LAYERS[2], LAYERS[6], LAYERS[10]],
                         ids=[IDS[0], IDS[2], IDS[6], IDS[10]])
def test_autocast_bf16(name, factory, shape):
    layer, model = _model(factory, torch.float32)
    x = torch.randn(shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = layer(x)
        with gnn.use_task(model, "a"):
            out = model(x)
        with gnn.use_tasks(model, torch.arange(shape[0]) % 3):
            mixed = model(x)
        direct = torch.ops.gmem.modulated_conv(x, model[0].weight_norm, *model[0].style(1)[:2], None, None,
                                               list(model[0].stride), list(model[0]._op_padding),
                                               list(model[0].dilation), model[0].transposed,
                                               list(model[0].output_padding), model[0].groups)
    assert plain.dtype == out.dtype == mixed.dtype == direct.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model[0].styles["a"].gamma.grad.dtype == torch.float32


def test_state_dict_keyed_by_task_name():
    _, model = _model(LAYERS[9][1], torch.float32)
    state = model.state_dict()
    assert state["0.styles.a.gamma"].shape == (4, 3) and state["0.styles.b.bias"].shape == (6,)
    _, other = _model(LAYERS[9][1], torch.float32, tasks=("b", "a"))
    other.load_state_dict(state)
    x = torch.randn(LAYERS[9][2])
    with gnn.use_task(model, "a"), gnn.use_task(other, "a"):
        assert torch.equal(model(x), other(x))


def test_convert_maps_every_kind():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 8, 2, stride=2), nn.Conv1d(8, 8, 3),
                          nn.Conv3d(2, 2, 1), nn.ConvTranspose1d(2, 2, 1), nn.ConvTranspose3d(2, 2, 1),
                          nn.Conv2d(8, 8, 3, groups=8), nn.Linear(2, 2))
    converted = gnn.convert(model)
    assert converted == [str(i) for i in range(8)] and converted.skipped == []
    assert [type(m).__name__ for m in model] == [
        "ModulatedConv2d", "ModulatedConvTranspose2d", "ModulatedConv1d", "ModulatedConv3d",
        "ModulatedConvTranspose1d", "ModulatedConvTranspose3d", "ModulatedConv2d", "ModulatedLinear"]


def test_transposed_output_size():
    layer = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)
    model = nn.Sequential(copy.deepcopy(layer))
    gnn.convert(model)
    gnn.add_task(model, "a")
    x = torch.randn(1, 2, 4, 4)
    assert torch.equal(model[0](x, output_size=[8, 8]), layer(x, output_size=[8, 8]))
    with gnn.use_task(model, "a"):
        assert model[0](x, output_size=(1, 2, 8, 8)).shape == (1, 3, 8, 8)
        with pytest.raises(ValueError, match="output_size"):
            model[0](x, output_size=[10, 8])


def test_bad_input_errors():
    wn = torch.randn(6, 2, 3)
    x = torch.randn(2, 4, 7)
    g = torch.randn(6, 2)
    with pytest.raises(ValueError, match="groups=4 must divide C_out = 6"):
        ops.modulated_conv(x, wn, g, g, groups=4)
    with pytest.raises(ValueError, match="expects C_in = 2"):
        ops.modulated_conv(x, wn, g, g)
    with pytest.raises(ValueError, match=r"\[N, C_in, L\] \(kernel rank 1"):
        ops.modulated_conv(torch.randn(2, 4, 7, 7), wn, g, g, groups=2)
    with pytest.raises(ValueError, match="weight_norm must be"):
        ops.modulated_conv(x, torch.randn(6, 2), g, g)
    with pytest.raises(ValueError, match="output_padding is for transposed"):
        ops.modulated_conv(x, wn, g, g, groups=2, output_padding=1)
    with pytest.raises(ValueError, match="must be smaller than the stride"):
        ops.modulated_conv(torch.randn(2, 6, 5), wn, g, g, transposed=True, output_padding=1)
    with pytest.raises(TypeError, match="stride must be an int or 1 ints"):
        ops.modulated_conv(x, wn, g, g, groups=2, stride=(1, 1))
    with pytest.raises(ValueError, match="gamma must be"):
        ops.modulated_conv(x, wn, torch.randn(6, 4), torch.randn(6, 4), groups=2)
    with pytest.raises(IndexError, match="task_ids must lie in"):
        ops.modulated_conv(x, wn, g.expand(2, 6, 2), g.expand(2, 6, 2), groups=2, task_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        ops.modulated_conv(torch.randn(2, 4, 2), wn, g, g, groups=2)
    with pytest.raises(TypeError, match="dtype"):
        ops.modulated_conv(x, wn.double(), g, g, groups=2)
    with pytest.raises(TypeError, match="wraps an nn.Conv1d"):
        gnn.ModulatedConv1d(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="output_size only for transposed"):
        model = nn.Sequential(nn.Conv1d(1, 1, 1))
        gnn.convert(model)
        model[0](torch.randn(1, 1, 3), output_size=[3])


def test_empty_mixed_batch():
    args, kwargs = _op_case(2, True, 2, mixed=True, dtype=torch.float32)
    x = args[0][:0]
    kwargs["task_ids"] = kwargs["task_ids"][:0]
    out = ops.modulated_conv(x, *args[1:], **kwargs)
    assert out.shape[0] == 0 and out.shape[1] == 6
    expected = F.conv_transpose2d(torch.zeros(1, 4, 5, 4), torch.zeros(4, 3, 3, 2), None, 2, 1, 1, 2, (1, 2))
    assert out.shape[2:] == expected.shape[2:]


@pytest.mark.parametrize("backend", ops.available_backends())
@pytest.mark.parametrize("rank, transposed, groups", [(1, True, 2), (3, False, 2)])
def test_op_backends_against_formula(backend, rank, transposed, groups):
    """Each backend builds the weight (``gmem::madafm_weight``); float32 against the float64 formula."""
    args, kwargs = _op_case(rank, transposed, groups, mixed=True, dtype=torch.float32, seed=5)
    args = tuple(a.requires_grad_() if i in (0, 2, 3, 4) else a for i, a in enumerate(args))
    out = ops.modulated_conv(*args, **kwargs, backend=backend)
    expected = conv_nd(*args, **kwargs)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(out.square().sum(), [args[i] for i in (0, 2, 3, 4)])
    leaves = [a.detach().double().requires_grad_() for a in args]
    ref = conv_nd(*leaves, **kwargs)
    ref_grads = torch.autograd.grad(ref.square().sum(), [leaves[i] for i in (0, 2, 3, 4)])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name, factory, shape", LAYERS, ids=IDS)
def test_export_and_unload(name, factory, shape):
    layer, model = _model(factory, torch.float32)
    x = torch.randn(shape)
    exported = gnn.export(model, "b")
    assert type(exported[0]) is type(layer)
    with gnn.use_task(model, "b"):
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)
    plain = gnn.unload(model)
    assert type(plain[0]) is type(layer) and torch.equal(plain(x), layer(x))
    assert plain[0].state_dict().keys() == layer.state_dict().keys()


def test_doctor_names_the_kernel_of_every_layer_kind():
    from gmem import doctor

    rows = [r for r in doctor.layer_kinds() if r["device"] == "cpu"]
    kinds = {r["kind"].split(" ")[0] for r in rows}
    assert kinds == {t.__name__ for t in gnn.MODULATED_LAYERS}
    compiled = "cpu" in ops.available_backends()
    for row in rows:
        assert row["compiled"] == compiled, row
        assert ("reference" in row["runs"]) != compiled
        if row["op"] == "gmem::modulated_conv":
            assert "PyTorch's convolution" in row["runs"]


def test_values_known():
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = torch.zeros(2)
    assert ops.values_known(t) and not ops.values_known(t.to("meta"))
    with FakeTensorMode() as mode:
        assert not ops.values_known(mode.from_tensor(t))


@pytest.mark.parametrize("shape", [(5, 3, 4), (3, 2, 2, 3, 2), (4, 1, 1, 1, 1), (4, 2, 1)])
def test_normalize_weight_any_kernel_rank(shape):
    w = torch.randn(shape, dtype=torch.float64)
    wn, mean, std = ops.normalize_weight(w)
    assert wn.shape == w.shape and mean.shape == std.shape == shape[:2]
    window = (1,) * (len(shape) - 2)
    torch.testing.assert_close(std.reshape(*shape[:2], *window) * wn + mean.reshape(*shape[:2], *window), w)
    flat = w.flatten(2)
    if flat.shape[-1] > 1:
        torch.testing.assert_close(mean, flat.mean(-1))
        torch.testing.assert_close(std, flat.std(-1))
    else:  # a one-element slice is not normalised
        assert torch.equal(mean, torch.zeros_like(mean)) and torch.equal(std, torch.ones_like(std))


class _LowRankEntry(nn.Module):
    """A bank entry whose gamma/beta read as LowRank factors (as a compressed task's do)."""

    def __init__(self, gamma, beta, bias):
        super().__init__()
        self.factors = (gamma, beta)
        self.bias = nn.Parameter(bias.detach().clone())

    gamma = property(lambda self: self.factors[0])
    beta = property(lambda self: self.factors[1])


@pytest.mark.parametrize("name, factory, shape", [LAYERS[1], LAYERS[3], LAYERS[6], LAYERS[9]],
                         ids=[IDS[1], IDS[3], IDS[6], IDS[9]])
def test_layer_lowrank_entries_equal_dense(name, factory, shape):
    from gmem.compress.posthoc import compress_style

    _, model = _model(factory)
    x = torch.randn(shape, dtype=torch.float64)
    factors = compress_style(model, "a", keep=1.0)["0"]
    layer = model[0]
    bias = layer.style(1)[2]
    with gnn.use_task(model, "a"):
        dense = model(x)
    layer.set_entry(1, _LowRankEntry(factors["gamma"]["factors"], factors["beta"]["factors"], bias))
    assert isinstance(layer.style(1)[0], ops.LowRank)
    with gnn.use_task(model, "a"):
        torch.testing.assert_close(model(x), dense, rtol=1e-10, atol=1e-10)
    ids = torch.tensor([1] * shape[0])
    ids[0] = 0
    with gnn.use_tasks(model, ids):
        mixed = model(x)
    torch.testing.assert_close(mixed[1:], dense[1:], rtol=1e-10, atol=1e-10)
    with gnn.use_tasks(model, torch.ones(shape[0], dtype=torch.long)):  # every task present low-rank: stacked factors
        torch.testing.assert_close(model(x), dense, rtol=1e-10, atol=1e-10)
