"""gmem.nn task identity and selection: banks keyed by name, per-call selection (threads, asyncio),
bad calls that leave the model unchanged."""
import asyncio
import copy
import threading

import pytest
import torch
from torch import nn

import gmem.nn as gnn

NAMES = ["plain", "with.dot", "100%", "keys", "white space", "ünï"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.norm = nn.GroupNorm(2, 6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.bn(self.conv(x)))).flatten(1))


def make(seed=0):
    torch.manual_seed(seed)
    return Net()


def x_batch(n=4, seed=1):
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def perturb(model, task, seed):
    """Give ``task`` values of its own (styles and norm copies)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gnn.trainable_parameters(model, task):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for _, m in gnn.per_task_modules(model):
            entry = m.copies[gnn.encode_task(task)]
            if hasattr(entry, "running_mean"):
                entry.running_mean.add_(0.1 * torch.randn(entry.running_mean.shape, generator=g))


def run(model, x, task):
    with torch.no_grad(), gnn.use_task(model, task):
        return model(x)


def test_task_names_encode_reversibly():
    for name in NAMES + ["%2E", "a..b", "training", "\n", "x" * 200]:
        key = gnn.encode_task(name)
        assert "." not in key and key and gnn.decode_task(key) == name
        nn.ModuleDict({key: nn.Identity()})  # accepted as a key


def test_state_dict_keys_carry_names_and_load_by_name_in_any_order():
    a, b = make(0), make(0)
    for m in (a, b):
        gnn.convert(m)
        m.eval()
    for name in NAMES:
        gnn.add_task(a, name)
    for name in reversed(NAMES):
        gnn.add_task(b, name)
    for k, name in enumerate(NAMES):
        perturb(a, name, seed=k)
    keys = a.state_dict().keys()
    for name in NAMES:
        key = gnn.encode_task(name)
        assert f"conv.styles.{key}.gamma" in keys and f"bn.copies.{key}.running_mean" in keys
    x = x_batch()
    before_b = {name: run(b, x, name) for name in NAMES}
    b.load_state_dict(a.state_dict())
    for name in NAMES:
        out = run(b, x, name)
        assert torch.equal(out, run(a, x, name))
        assert not torch.equal(out, before_b[name])
    assert torch.equal(run(b, x, "source"), run(a, x, "source"))
    assert gnn.list_tasks(b) == ["source"] + list(reversed(NAMES))  # each model keeps its order


def test_loading_a_state_dict_with_a_task_the_model_lacks_names_the_task():
    a, b = make(), make()
    for m in (a, b):
        gnn.convert(m)
    gnn.add_task(a, "x")
    gnn.add_task(a, "y")
    gnn.add_task(b, "x")
    with pytest.raises(RuntimeError, match=r"lacks.*'y'|\['y'\].*lacks|tasks \['y'\]"):
        b.load_state_dict(a.state_dict())
    gnn.add_task(b, "z")
    gnn.add_task(b, "y")
    with pytest.raises(RuntimeError, match=r"\['z'\] of this model are missing"):
        b.load_state_dict(a.state_dict())


def test_threads_selecting_different_tasks_get_single_thread_outputs():
    model = make()
    gnn.convert(model)
    model.eval()
    tasks = ["a", "b", "c"]
    for k, name in enumerate(tasks):
        gnn.add_task(model, name)
        perturb(model, name, seed=k)
    x = x_batch()
    choices = ["source"] + tasks
    expected = {t: run(model, x, t) for t in choices}
    mixed_ids = torch.tensor([3, 0, 1, 2])
    with torch.no_grad(), gnn.use_tasks(model, mixed_ids):
        expected_mixed = model(x)
    errors, barrier = [], threading.Barrier(8)

    def worker(k):
        barrier.wait()
        for i in range(100):
            if (k + i) % 5 == 4:
                with torch.no_grad(), gnn.use_tasks(model, mixed_ids):
                    ok = torch.equal(model(x), expected_mixed)
            else:
                task = choices[(k + i) % 4]
                ok = torch.equal(run(model, x, task), expected[task])
            if not ok:
                errors.append((k, i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_asyncio_tasks_selecting_different_tasks():
    model = make()
    gnn.convert(model)
    model.eval()
    for k, name in enumerate(["a", "b"]):
        gnn.add_task(model, name)
        perturb(model, name, seed=k)
    x = x_batch()
    expected = {t: run(model, x, t) for t in ("source", "a", "b")}

    async def serve(task):
        results = []
        with gnn.use_task(model, task):
            for _ in range(5):
                await asyncio.sleep(0)  # the other coroutines run inside their own blocks here
                with torch.no_grad():
                    results.append(torch.equal(model(x), expected[task]))
        return results

    async def main():
        return await asyncio.gather(*(serve(t) for t in ["a", "b", "source", "b", "a"]))

    assert all(all(r) for r in asyncio.run(main()))


def test_selection_of_one_model_does_not_leak_into_another():
    a, b = make(0), make(1)
    for m in (a, b):
        gnn.convert(m)
        m.eval()
        gnn.add_task(m, "t")
        perturb(m, "t", seed=3)
    x = x_batch()
    b_source = run(b, x, "source")
    with torch.no_grad(), gnn.use_task(a, "t"):
        assert torch.equal(b(x), b_source)


def _snapshot(model):
    return copy.deepcopy(model.state_dict()), gnn.list_tasks(model), [
        (m.active_task, m.task_ids, m.style_override, m.class_ids) for _, m in gnn.modulated_layers(model)
    ]


def _assert_unchanged(model, snap):
    state, tasks, defaults = snap
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in now)
    assert gnn.list_tasks(model) == tasks
    assert [(m.active_task, m.task_ids, m.style_override, m.class_ids)
            for _, m in gnn.modulated_layers(model)] == defaults


def test_every_bad_call_leaves_the_model_unchanged():
    model = make()
    gnn.convert(model)
    gnn.add_task(model, "a")
    perturb(model, "a", seed=0)
    snap = _snapshot(model)
    x = x_batch()
    bad_calls = [
        (ValueError, lambda: gnn.add_task(model, "a")),
        (KeyError, lambda: gnn.add_task(model, "b", init="zzz")),
        (ValueError, lambda: gnn.add_task(model, "b", num_classes=0)),
        (TypeError, lambda: gnn.add_task(model, 3)),
        (ValueError, lambda: gnn.remove_task(model, "source")),
        (KeyError, lambda: gnn.remove_task(model, "zzz")),
        (IndexError, lambda: gnn.use_task(model, 9)),
        (IndexError, lambda: gnn.use_tasks(model, torch.tensor([0, 5]))),
        (TypeError, lambda: gnn.use_tasks(model, torch.tensor([0.5]))),
        (TypeError, lambda: gnn.use_classes(model, torch.tensor([0.5]))),
        (ValueError, lambda: gnn.trainable_parameters(model, "source")),
        (ValueError, lambda: gnn.set_backend(model, "nope")),
        (KeyError, lambda: gnn.load_style_state_dict(model, "a", {"conv.gamma": torch.zeros(1)})),
        (ValueError, lambda: gnn.convert(model)),
        (ValueError, lambda: gnn.export(model, "source") and gnn.export(make(), 0)),
        (TypeError, lambda: gnn.interpolate(model, "a", "source", "half").__enter__()),
    ]
    for error, call in bad_calls:
        with pytest.raises(error):
            call()
        _assert_unchanged(model, snap)
    bad = gnn.style_state_dict(model, "a")
    bad["fc.bias"] = torch.zeros(99)
    bad["conv.gamma"] = bad["conv.gamma"] + 1  # a valid change before the bad one: must not land
    with pytest.raises(ValueError, match="fc.bias must have shape"):
        gnn.load_style_state_dict(model, "a", bad)
    _assert_unchanged(model, snap)
    # an error inside a with-block restores the selection
    with pytest.raises(RuntimeError, match="boom"), gnn.use_task(model, "a"):
        raise RuntimeError("boom")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), gnn.unload(model).eval()(x))
    model.train()
    _assert_unchanged(model, snap)
