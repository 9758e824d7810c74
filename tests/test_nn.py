"""gmem.nn: conversion, task bank, selection, interpolation, no forgetting, bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gmem.nn as gnn
from gmem.nn import ModulatedConv2d, ModulatedLinear


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", bias=False),
            nn.LeakyReLU(0.2),
            nn.Conv2d(8, 6, 3, stride=2, padding="valid", dilation=1),
            nn.Conv2d(6, 6, 3, padding="same", dilation=2, padding_mode="circular"),
        )
        self.shortcut = nn.Conv2d(3, 6, 1, stride=2)
        self.head = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        h = self.block(F.leaky_relu(self.stem(x), 0.2))
        h = h + self.shortcut(x)[:, :, : h.shape[2], : h.shape[3]]
        return self.head(h.flatten(1))


def mlp():
    return nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.Tanh(), nn.Linear(16, 3))


def make(model_fn, seed=0):
    torch.manual_seed(seed)
    model = model_fn()
    base = copy.deepcopy(model)
    return model, base


def inputs(model_fn, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 7, 7, generator=g) if model_fn is SmallCNN else torch.randn(n, 7, generator=g)


def train(model, task, x, steps=3, lr=0.05):
    opt = torch.optim.Adam(gnn.style_parameters(model, task), lr=lr)
    for _ in range(steps):
        with gnn.use_task(model, task):
            loss = (model(x) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


MODELS = [SmallCNN, mlp]


@pytest.mark.parametrize("model_fn", MODELS)
def test_convert_source_is_bit_identical(model_fn):
    model, base = make(model_fn)
    x = inputs(model_fn)
    names = gnn.convert(model)
    expected = [n for n, m in base.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert names == expected
    assert all(isinstance(model.get_submodule(n), (ModulatedConv2d, ModulatedLinear)) for n in names)
    assert torch.equal(model(x), base(x))
    with gnn.use_task(model, "source"):
        assert torch.equal(model(x), base(x))
    # frozen base, nothing trainable until a task is added
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("model_fn", MODELS)
def test_new_task_starts_at_source_and_only_it_trains(model_fn):
    model, base = make(model_fn)
    x = inputs(model_fn)
    gnn.convert(model)
    assert gnn.add_task(model, "a") == 1
    with gnn.use_task(model, "a"):
        torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-5)
        model(x).sum().backward()
    params = gnn.style_parameters(model, "a")
    assert params and all(p.grad is not None for p in params)
    frozen = [p for n, p in model.named_parameters() if "styles" not in n]
    assert all(p.grad is None and not p.requires_grad for p in frozen)


@pytest.mark.parametrize("model_fn", MODELS)
def test_no_forgetting(model_fn):
    model, base = make(model_fn)
    x = inputs(model_fn)
    gnn.convert(model)
    gnn.add_task(model, "a")
    train(model, "a", x)
    with gnn.use_task(model, "a"):
        out_a = model(x)
    state_a = gnn.style_state_dict(model, "a")
    gnn.add_task(model, "b")
    train(model, "b", x + 0.5, steps=4)
    with gnn.use_task(model, "a"):
        assert torch.equal(model(x), out_a)
    with gnn.use_task(model, "b"):
        assert not torch.allclose(model(x), out_a)
    for key, value in gnn.style_state_dict(model, "a").items():
        assert torch.equal(value, state_a[key])
    assert torch.equal(model(x), base(x))  # the source never moves


@pytest.mark.parametrize("model_fn", MODELS)
def test_mixed_batch_equals_per_task(model_fn):
    model, _ = make(model_fn)
    x = inputs(model_fn, n=7)
    gnn.convert(model)
    for name in ("a", "b", "c"):
        gnn.add_task(model, name)
        train(model, name, x * (1 + len(name)), steps=2)
    task_ids = torch.tensor([2, 0, 3, 2, 1, 3, 2])  # any order, task order mixed, source included
    with gnn.use_tasks(model, task_ids):
        mixed = model(x)
    for n, t in enumerate(task_ids.tolist()):
        with gnn.use_task(model, t):
            torch.testing.assert_close(mixed[n], model(x[n : n + 1])[0], rtol=1e-5, atol=1e-5)
    with gnn.use_tasks(model, ["b", "b", "a", "source", "c", "c", "a"]) :
        assert model(x).shape == mixed.shape


@pytest.mark.parametrize("model_fn", MODELS)
def test_mixed_batch_gradients_reach_only_present_tasks(model_fn):
    model, _ = make(model_fn)
    x = inputs(model_fn, n=3)
    gnn.convert(model)
    for name in ("a", "b", "c"):
        gnn.add_task(model, name)
    with gnn.use_tasks(model, torch.tensor([1, 3, 1])):
        model(x).sum().backward()
    assert all(p.grad is not None for p in gnn.style_parameters(model, "a") + gnn.style_parameters(model, "c"))
    assert all(p.grad is None for p in gnn.style_parameters(model, "b"))


def test_interpolation_endpoints_groups_and_blocks():
    model, base = make(SmallCNN)
    x = inputs(SmallCNN)
    gnn.convert(model)
    gnn.add_task(model, "a")
    gnn.add_task(model, "b")
    train(model, "a", x)
    train(model, "b", -x)
    with gnn.use_task(model, "a"):
        out_a = model(x)
    with gnn.use_task(model, "b"):
        out_b = model(x)
    with gnn.interpolate(model, "a", "b", 0.0):
        assert torch.equal(model(x), out_a)
    with gnn.interpolate(model, "a", "b", 1.0):
        assert torch.equal(model(x), out_b)
    with gnn.interpolate(model, "a", "b", 0.5):
        mid = model(x)
    assert not torch.allclose(mid, out_a) and not torch.allclose(mid, out_b)
    # scales only: b's gamma with a's beta and bias, layer by layer
    with gnn.interpolate(model, "a", "b", 1.0, groups=["scale"]):
        scales_only = model(x)
    hybrid = copy.deepcopy(model)
    for _, layer in gnn.modulated_layers(hybrid):
        layer.styles["a"].gamma.data.copy_(layer.styles["b"].gamma.data)
    with gnn.use_task(hybrid, "a"):
        torch.testing.assert_close(scales_only, hybrid(x))
    # one block only: every other layer keeps task a
    with gnn.interpolate(model, "a", "b", 1.0, layers="block"):
        block_only = model(x)
    hybrid = copy.deepcopy(model)
    for name, layer in gnn.modulated_layers(hybrid):
        if name.startswith("block."):
            for group in ("gamma", "beta", "bias"):
                getattr(layer.styles["a"], group).data.copy_(getattr(layer.styles["b"], group).data)
    with gnn.use_task(hybrid, "a"):
        torch.testing.assert_close(block_only, hybrid(x))
    # selection is restored afterwards: the model runs the source again
    assert torch.equal(model(x), base(x)) and all(m.style_override is None for _, m in gnn.modulated_layers(model))


def test_task_management():
    model, base = make(mlp)
    x = inputs(mlp)
    gnn.convert(model)
    n_params = sum(p.numel() for p in model.parameters())
    gnn.add_task(model, "a")
    per_task = gnn.count_style_parameters(model, "a")
    assert sum(p.numel() for p in model.parameters()) == n_params + per_task
    # gamma, beta, bias per output of every layer
    assert per_task == 3 * (16 + 16 + 3)
    train(model, "a", x)
    gnn.add_task(model, "copy", init="a")
    with gnn.use_task(model, "a"):
        out_a = model(x)
    with gnn.use_task(model, "copy"):
        assert torch.equal(model(x), out_a)
    assert gnn.list_tasks(model) == ["source", "a", "copy"]
    gnn.remove_task(model, "a")
    assert gnn.list_tasks(model) == ["source", "copy"]
    with gnn.use_task(model, "copy"):
        assert torch.equal(model(x), out_a)
    assert sum(p.numel() for p in model.parameters()) == n_params + per_task
    # style state dicts round-trip into another task
    gnn.add_task(model, "loaded")
    gnn.load_style_state_dict(model, "loaded", gnn.style_state_dict(model, "copy"))
    with gnn.use_task(model, "loaded"):
        assert torch.equal(model(x), out_a)
    gnn.set_task(model, "loaded")
    assert torch.equal(model(x), out_a)
    gnn.set_task(model, 0)
    assert torch.equal(model(x), base(x))


def test_conditional_task_has_one_bias_per_class():
    model, _ = make(mlp)
    x = inputs(mlp, n=4)
    gnn.convert(model)
    gnn.add_task(model, "digits", num_classes=3)
    gnn.add_task(model, "plain")
    layer = model[0]
    assert layer.styles["digits"].bias.shape == (3, 16)
    with torch.no_grad():
        layer.styles["digits"].bias[1] += 1.0
    labels = torch.tensor([0, 1, 2, 1])
    with gnn.use_task(model, "digits"), gnn.use_classes(model, labels):
        out = model(x)
    with gnn.use_task(model, "digits"), gnn.use_classes(model, torch.zeros(4, dtype=torch.long)):
        out0 = model(x)
    assert torch.equal(out[0], out0[0]) and not torch.allclose(out[1], out0[1])
    with gnn.use_task(model, "digits"), pytest.raises(ValueError, match="use_classes"):
        model(x)
    with gnn.use_task(model, "digits"), gnn.use_classes(model, torch.tensor([0, 3, 0, 0])):
        with pytest.raises(IndexError, match="class ids"):
            model(x)
    # mixed batch of a conditional and a plain task equals the per-task outputs
    task_ids = torch.tensor([1, 2, 1, 0])
    with gnn.use_tasks(model, task_ids), gnn.use_classes(model, labels):
        mixed = model(x)
    for n, t in enumerate(task_ids.tolist()):
        with gnn.use_task(model, t), gnn.use_classes(model, labels[n : n + 1]):
            torch.testing.assert_close(mixed[n], model(x[n : n + 1])[0], rtol=1e-5, atol=1e-5)


def test_torch_compile_matches_eager():
    model, _ = make(SmallCNN)
    x = inputs(SmallCNN)
    gnn.convert(model)
    gnn.add_task(model, "a")
    train(model, "a", x)
    compiled = torch.compile(model, fullgraph=True)
    with gnn.use_task(model, "a"):
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(x), model(x))
    with gnn.use_tasks(model, torch.tensor([1, 0, 1, 1])):
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_include_exclude_and_grouped_convs():
    model, _ = make(SmallCNN)
    assert gnn.convert(model, include="block") == ["block.0", "block.2", "block.3"]
    model, _ = make(SmallCNN)
    assert gnn.convert(model, exclude=["shortcut", "head"]) == ["stem", "block.0", "block.2", "block.3"]
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1))
    converted = gnn.convert(grouped)
    assert converted == ["0", "1"] and converted.skipped == []
    assert isinstance(grouped[0], gnn.ModulatedConv2d) and grouped[0].weight_std.shape == (4, 2)
    with pytest.raises(ValueError, match="matched no"):
        gnn.convert(mlp(), include="nothing*")


def test_bad_input_leaves_model_unchanged():
    model, _ = make(mlp)
    x = inputs(mlp)
    gnn.convert(model)
    gnn.add_task(model, "a")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="exists already"):
        gnn.add_task(model, "a")
    with pytest.raises(KeyError, match="unknown task 'zzz'"):
        gnn.add_task(model, "b", init="zzz")
    with pytest.raises(TypeError, match="non-empty string"):
        gnn.add_task(model, "")
    with pytest.raises(KeyError, match="unknown task"):
        with gnn.use_task(model, "zzz"):
            pass
    with pytest.raises(IndexError, match="out of range"):
        with gnn.use_task(model, 5):
            pass
    with pytest.raises(IndexError, match="must lie in"):
        with gnn.use_tasks(model, torch.tensor([0, 2, 0, 0])):
            pass
    with pytest.raises(TypeError, match="integer"):
        with gnn.use_tasks(model, torch.tensor([0.0, 1.0])):
            pass
    with gnn.use_tasks(model, torch.tensor([0, 1, 1])):  # wrong length for the batch
        with pytest.raises(ValueError, match="task_ids must have shape"):
            model(x)
    with pytest.raises(ValueError, match="source"):
        gnn.style_parameters(model, "source")
    with pytest.raises(ValueError, match="source"):
        gnn.remove_task(model, "source")
    bad = gnn.style_state_dict(model, "a")
    bad["0.gamma"] = torch.zeros(99)
    bad["2.gamma"] = bad["2.gamma"] + 1
    with pytest.raises(ValueError, match="0.gamma must have shape"):
        gnn.load_style_state_dict(model, "a", bad)
    with pytest.raises(KeyError, match="missing keys"):
        gnn.load_style_state_dict(model, "a", {})
    with pytest.raises(ValueError, match="no modulated layers"):
        gnn.add_task(mlp(), "a")
    with pytest.raises(ValueError, match="unknown parameter group"):
        with gnn.interpolate(model, "source", "a", 0.5, groups=["weights"]):
            pass
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert gnn.list_tasks(model) == ["source", "a"]
    # the selection state survives an error inside a block
    with pytest.raises(RuntimeError):
        with gnn.use_task(model, "a"):
            raise RuntimeError("boom")
    assert all(m.active_task == 0 for _, m in gnn.modulated_layers(model))


def test_state_dict_round_trip_of_whole_model():
    model, _ = make(SmallCNN)
    x = inputs(SmallCNN)
    gnn.convert(model)
    gnn.add_task(model, "a")
    train(model, "a", x)
    other, _ = make(SmallCNN, seed=5)
    gnn.convert(other)
    gnn.add_task(other, "a")
    other.load_state_dict(model.state_dict())
    for m in (model, other):
        gnn.set_task(m, "a")
    assert torch.equal(model(x), other(x))
