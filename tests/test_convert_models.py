"""convert / export / unload on models a new user brings: every layer kind, reused and tied modules.

The promises tested, on a small U-Net (ConvTranspose2d, GroupNorm, a Linear used twice, a Conv1d),
torchvision's MobileNetV3-small (depthwise convolutions, BatchNorm), a small 3-D conv net and a
GPT-style model whose head shares the embedding's weight:

* ``convert`` modulates every layer of a kind in ``gnn.MODULATED_LAYERS`` and lists every other module
  holding weights in ``.skipped`` (``strict=True`` raises instead); a module reached under several
  names stays one module;
* after training two tasks (``trainable_parameters`` only, train mode) the source is bit for bit the
  unconverted model and each task is independent of the other's training; a mixed-task batch equals
  per-sample calls;
* ``export`` equals the task and loads with ``load_state_dict(strict=True)`` into the stock
  architecture (a task's bias on a bias-free conv folded into the BatchNorm after it);
* ``unload`` equals the original, state dict, reuse and ties included.
"""
import copy

import pytest
import torch
import torchvision
from test_nn_models import outputs, perturb, train_task
from torch import nn

import gmem.nn as gnn

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class UNet(nn.Module):
    """Encoder (Conv2d + GroupNorm), a ConvTranspose2d decoder with a skip connection, a Conv1d over
    the flattened pixels and a Linear ``mix`` used twice (the same module, reached once by name)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.pool = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.pool_norm = nn.BatchNorm2d(16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.merge = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU())
        self.along = nn.Conv1d(8, 8, 3, padding=1)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        skip = self.down(x)
        deep = torch.relu(self.pool_norm(self.pool(skip)))
        y = self.merge(torch.cat([self.up(deep), skip], 1))
        n, c, h, w = y.shape
        y = self.along(y.flatten(2)).view(n, c, h, w)
        y = y.permute(0, 2, 3, 1)
        y = self.mix(torch.relu(self.mix(y)))          # one Linear, applied twice
        return self.out(y.permute(0, 3, 1, 2))


class Volume(nn.Module):
    """A small 3-D conv net: Conv3d + BatchNorm3d blocks, a pooled Linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(2, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), nn.ReLU(),
            nn.Conv3d(4, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm3d(8), nn.ReLU(),
        )
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3, 4)))


class TinyGPT(nn.Module):
    """Token embedding, one MLP block, a head tied to the embedding (``head.weight = emb.weight``)."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.block = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = self.emb(tokens)
        return self.head(h + self.block(h))


def mobilenet():
    return torchvision.models.mobilenet_v3_small(weights=None, num_classes=5)


def batch(shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


MODELS = {
    "unet": (UNet, lambda: batch((3, 3, 8, 8))),
    "mobilenet_v3_small": (mobilenet, lambda: batch((3, 3, 32, 32))),
    "volume": (Volume, lambda: batch((3, 2, 6, 6, 6))),
}


def weight_bearing(model):
    """Names of the modules holding parameters of their own (each module once)."""
    return [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_layer_is_modulated_or_reported_and_training_two_tasks_keeps_the_rest(kind):
    make, inputs = MODELS[kind]
    x = inputs()
    torch.manual_seed(0)
    model = make()
    stock = copy.deepcopy(model)
    model.eval(), stock.eval()
    with torch.no_grad():
        expected = stock(x)
    supported = [n for n, m in model.named_modules() if type(m) in gnn.MODULATED_LAYERS]
    names = gnn.convert(model, strict=True)  # every layer with weights is modulated or copied per task
    assert sorted(names) == sorted(supported) and names.skipped == []
    # every other module with weights is copied per task (norms) or reported
    handled = set(names) | set(names.per_task) | {n for n, _ in names.skipped}
    assert set(weight_bearing(stock)) <= handled
    assert all(reason for _, reason in names.skipped)

    gnn.add_task(model, "one")
    train_task(model, "one", x, steps=2)
    out_one = outputs(model, x, "one")
    assert not torch.allclose(out_one, expected), "training changed nothing: the test would be vacuous"
    gnn.add_task(model, "two")
    train_task(model, "two", x * 0.5 + 1, steps=2)
    out_two = outputs(model, x, "two")
    assert torch.equal(outputs(model, x, "source"), expected)
    assert torch.equal(outputs(model, x, "one"), out_one)
    assert not torch.allclose(out_two, out_one)

    ids = torch.tensor([2, 0, 1])
    with torch.no_grad(), gnn.use_tasks(model, ids):
        mixed = model(x)
    for n, t in enumerate(ids.tolist()):
        torch.testing.assert_close(mixed[n], outputs(model, x[n:n + 1], t)[0], rtol=1e-5, atol=1e-5)

    for task, value in (("one", out_one), ("two", out_two)):
        plain = gnn.export(model, task)
        assert plain.export_report["gained_bias"] == [], plain.export_report
        fresh = make()
        fresh.load_state_dict(plain.state_dict(), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(fresh.eval()(x), value, rtol=1e-4, atol=1e-4)

    original = gnn.unload(model)
    assert_same_state(original, stock)
    assert [type(m) for m in original.modules()] == [type(m) for m in stock.modules()]
    with torch.no_grad():
        assert torch.equal(original.eval()(x), expected)


def test_a_module_reached_under_two_names_is_converted_once():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    stock = copy.deepcopy(model)
    assert gnn.convert(model) == ["0"]
    assert model[0] is model[2] and isinstance(model[0], gnn.ModulatedLinear)
    gnn.add_task(model, "a")
    perturb(model, "a")
    x = batch((3, 4))
    # both uses run the task: the output is the plain model with the task's weights in both places
    layer = model[0]
    weight, bias = (gnn.export(model, "a")[0].get_parameter(k).detach() for k in ("weight", "bias"))
    expected = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, weight, bias)), weight, bias)
    torch.testing.assert_close(outputs(model, x, "a"), expected, rtol=1e-5, atol=1e-6)
    assert layer.task_names == ["source", "a"]
    plain = gnn.export(model, "a")
    assert plain[0] is plain[2] and type(plain[0]) is nn.Linear
    original = gnn.unload(model)
    assert original[0] is original[2]
    assert_same_state(original, stock)
    assert sum(p.numel() for p in original.parameters()) == sum(p.numel() for p in stock.parameters())


def test_every_convolution_kind_is_modulated():
    model = UNet()
    names = gnn.convert(model)
    assert sorted(names) == ["along", "down.0", "merge.0", "mix", "out", "pool", "up"]
    assert type(model.up) is gnn.ModulatedConvTranspose2d and type(model.along) is gnn.ModulatedConv1d
    assert isinstance(model.mix, gnn.ModulatedLinear)
    assert sorted(names.per_task) == ["down.1", "merge.1", "pool_norm"]
    net = mobilenet()
    depthwise = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    names = gnn.convert(net, strict=True)
    assert len(depthwise) == 11 and set(depthwise) <= set(names)
    assert gnn.convert(Volume(), strict=True) == ["features.0", "features.3", "head"]


def test_the_issue_example_is_modulated_and_reported():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 8, 2, stride=2), nn.Conv1d(8, 8, 3))
    names = gnn.convert(model, strict=True)
    assert names == ["0", "1", "2"] and names.skipped == []


def test_tied_embedding_and_head_stay_tied_through_convert_and_unload():
    torch.manual_seed(0)
    model = TinyGPT()
    stock = copy.deepcopy(model)
    tokens = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = stock(tokens)
    with pytest.raises(ValueError, match="strict=True.*emb"):
        gnn.convert(copy.deepcopy(model), strict=True)
    with pytest.warns(UserWarning, match="emb"):
        names = gnn.convert(model)
    assert sorted(names) == ["block.1", "block.3", "head"]
    reason = dict(names.skipped)["emb"]
    assert "Embedding" in reason and "tied to head.weight" in reason
    assert model.head.weight is model.emb.weight  # one parameter still
    gnn.add_task(model, "a")
    train_task(model, "a", tokens, steps=2)
    out_a = outputs(model, tokens, "a")
    assert not torch.allclose(out_a, expected)
    gnn.add_task(model, "b")
    train_task(model, "b", tokens.flip(1), steps=2)
    with torch.no_grad():
        assert torch.equal(model(tokens), expected)
    assert torch.equal(outputs(model, tokens, "a"), out_a)
    ids = torch.tensor([2, 1, 0])
    with torch.no_grad(), gnn.use_tasks(model, ids):
        mixed = model(tokens)
    for n, t in enumerate(ids.tolist()):
        torch.testing.assert_close(mixed[n], outputs(model, tokens[n:n + 1], t)[0], rtol=1e-5, atol=1e-5)
    original = gnn.unload(model)
    assert original.head.weight is original.emb.weight
    assert sum(p.numel() for p in original.parameters()) == sum(p.numel() for p in stock.parameters())
    assert_same_state(original, stock)
    with torch.no_grad():
        assert torch.equal(original(tokens), expected)
    # a task changes the head's weight, not the embedding's: the export unties them and says so
    plain = gnn.export(model, "a")
    assert plain.export_report["untied"] == ["emb.weight"]
    assert plain.export_report["gained_bias"] == ["head"]  # the bias-free head gained the task's bias
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), outputs(model, tokens, "a"), rtol=1e-4, atol=1e-5)


def test_leaving_the_tied_head_unmodulated_keeps_the_tie_in_every_task():
    torch.manual_seed(0)
    model = TinyGPT()
    names = gnn.convert(model, exclude=["head", "emb"], strict=True)  # chosen, so strict accepts it
    assert sorted(names) == ["block.1", "block.3"] and sorted(names.chosen) == ["emb", "head"]
    gnn.add_task(model, "a")
    perturb(model, "a")
    plain = gnn.export(model, "a")
    assert plain.head.weight is plain.emb.weight and plain.export_report["untied"] == []
    stock = TinyGPT()
    stock.load_state_dict(plain.state_dict(), strict=True)


class Odd(nn.Module):
    """A module with a parameter of its own and no known kind."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


class StandardisedConv(nn.Conv2d):
    """A Conv2d subclass whose forward differs (weight standardisation): never converted."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def test_strict_raises_naming_every_module_left_behind_and_nothing_changes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Odd(), nn.PReLU(4), StandardisedConv(4, 4, 1), nn.Conv2d(4, 4, 1))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"strict=True.*'?1 \(Odd.*2 \(PReLU.*3 \(StandardisedConv subclasses"):
        gnn.convert(model, strict=True)
    assert not any(isinstance(m, gnn.ModulatedLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    names = gnn.convert(model, exclude=["1", "2", "3"], strict=True)
    assert names == ["0", "4"] and sorted(names.chosen) == ["1", "2", "3"]
    assert all("exclude" in r for _, r in names.skipped)


def test_export_folds_a_task_bias_into_the_batchnorm_after_a_bias_free_conv():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    model.eval()
    x = batch((2, 3, 32, 32))
    gnn.convert(model)
    gnn.add_task(model, "a")
    perturb(model, "a")  # gives every bias-free conv a non-zero task bias
    plain = gnn.export(model, "a")
    report = plain.export_report
    convs = [n for n, m in torchvision.models.resnet18().named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(report["folded_bias"]) == sorted(convs) and report["gained_bias"] == []
    assert report["folded_bias"]["layer1.0.conv1"] == "layer1.0.bn1"
    assert report["folded_bias"]["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    stock = torchvision.models.resnet18(num_classes=4)
    stock.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        expected = outputs(model, x, "a")
        torch.testing.assert_close(stock.eval()(x), expected, rtol=1e-4, atol=1e-4)


def test_export_reports_a_gained_bias_it_cannot_fold():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
    model.eval()
    gnn.convert(model)
    gnn.add_task(model, "a")
    perturb(model, "a")
    x = batch((2, 3, 6, 6))
    plain = gnn.export(model, "a")
    plain_bias = gnn.style_state_dict(model, "a")["2.bias"]
    assert plain.export_report["gained_bias"] == ["0"] and plain.export_report["folded_bias"] == {"2": "3"}
    assert plain[0].bias is not None and plain[2].bias is None
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), outputs(model, x, "a"), rtol=1e-4, atol=1e-5)
    # train mode too: the batch mean absorbs the bias, and the running mean moves as the task's does
    task_model = copy.deepcopy(model).train()
    with torch.no_grad(), gnn.use_task(task_model, "a"):
        torch.testing.assert_close(plain.train()(x), task_model(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain[3].running_mean, task_model[3].module(1).running_mean - plain_bias,
                               rtol=1e-5, atol=1e-6)
    # a task that leaves a bias-free layer's bias at zero exports no bias at all
    gnn.add_task(model, "untouched")
    assert gnn.export(model, "untouched").export_report["gained_bias"] == []


class Attention(nn.Module):
    """A patch conv, an nn.MultiheadAttention and an MLP: the attention's projections stay shared."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return h + self.mlp(h)


def test_attention_projections_are_reported_with_a_reason_and_acknowledged_by_exclude():
    model = Attention()
    with pytest.raises(ValueError, match=r"strict=True.*'attn \(nn.MultiheadAttention passes in_proj_weight"):
        gnn.convert(copy.deepcopy(model), strict=True)
    names = gnn.convert(copy.deepcopy(model))
    assert sorted(names) == ["mlp.1", "patch"]
    assert sorted(n for n, _ in names.skipped) == ["attn", "attn.out_proj"]
    names = gnn.convert(model, exclude=["attn"], strict=True)
    assert sorted(names.chosen) == ["attn", "attn.out_proj"]
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    gnn.add_task(model, "a")
    perturb(model, "a")
    x = batch((2, 3, 8, 8))
    plain = gnn.export(model, "a")
    stock = Attention()
    stock.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(stock.eval()(x), outputs(model.eval(), x, "a"), rtol=1e-4, atol=1e-5)


def test_transformer_encoder_layer_children_read_by_its_fused_path_are_reported():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    model = nn.Sequential(nn.Linear(4, 8), layer)
    names = gnn.convert(model)
    skipped = dict(names.skipped)
    assert names == ["0"]
    for child in ("linear1", "linear2", "norm1", "norm2"):
        assert "TransformerEncoderLayer reads this module's weights directly" in skipped[f"1.{child}"]
    assert "1.self_attn" in skipped


def test_filters_name_a_reused_module_by_any_of_its_names_and_a_second_convert_keeps_it_one():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(4, 4), lin, nn.ReLU(), lin)
    assert gnn.convert(copy.deepcopy(model), include=["3"]) == ["1"]  # "3" is the second name of "1"
    names = gnn.convert(model, exclude=["3"])
    assert names == ["0"] and names.chosen == ["1"]
    again = gnn.convert(model)  # converting again (before any task) takes what is left
    assert again == ["1"] and model[1] is model[3] and isinstance(model[3], gnn.ModulatedLinear)
    gnn.add_task(model, "a")
    original = gnn.unload(model)
    assert original[1] is original[3] and type(original[1]) is nn.Linear


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_mixed_batches_run_on_meta_tensors(kind):
    """Shape inference on the meta device: no data-dependent grouping (torch.unique has no meta kernel)."""
    make, inputs = MODELS[kind]
    x = inputs()
    model = make().eval()
    gnn.convert(model)
    gnn.add_task(model, "a")
    gnn.add_task(model, "b")
    ids = torch.tensor([2, 0, 1])
    with torch.no_grad(), gnn.use_tasks(model, ids):
        expected = model(x)
    model.to("meta")
    with torch.no_grad(), gnn.use_tasks(model, ids):  # the ids follow the model onto meta
        out = model(x.to("meta"))
    assert out.device.type == "meta" and out.shape == expected.shape
