"""gmem.integrations.avalanche: a GAN memory as generative replay inside an Avalanche strategy.

A class-incremental split of the embedded Fashion-MNIST (2 experiences of 2 classes, Avalanche's
``nc_benchmark``) trained by Avalanche's ``Naive`` strategy with the plugin: every experience becomes
one conditional task of the memory; while experience 2 trains, every minibatch carries replayed
samples of experience 1 with experience 1's global classes, shaped like the real images.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gmem import GANMemory
from gmem.data import demo_datasets

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Avalanche's optional solvers and deprecations warn at import
    from avalanche.benchmarks import nc_benchmark
    from avalanche.core import SupervisedPlugin
    from avalanche.training.supervised import Naive

from gmem.integrations.avalanche import GANMemoryReplayPlugin  # noqa: E402

CLASSES = (0, 1, 7, 9)
PER_CLASS = 24


class _Dataset(torch.utils.data.TensorDataset):
    """A TensorDataset with ``targets``, as Avalanche's benchmark generators expect."""

    def __init__(self, x, y):
        super().__init__(x, y)
        self.targets = y.tolist()


def _split():
    d = np.load(demo_datasets()["fashion_mnist"])
    keep = np.concatenate([np.flatnonzero(d["labels"] == c)[:PER_CLASS] for c in CLASSES])
    x = torch.from_numpy(d["images"][keep]).permute(0, 3, 1, 2)[:, :1, 2:30, 2:30].float() / 255  # [N, 1, 28, 28]
    y = torch.from_numpy(d["labels"][keep]).long()
    data = _Dataset(x, y)
    return nc_benchmark(data, data, n_experiences=2, task_labels=False, fixed_class_order=list(CLASSES))


class _Recorder(SupervisedPlugin):
    """Keeps every training minibatch as the model sees it (after the replay plugin extended it)."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def before_forward(self, strategy, **kwargs):
        self.batches.append((strategy.experience.current_experience, *(t.clone() for t in strategy.mbatch)))


def test_plugin_learns_each_experience_and_replays_the_earlier_ones():
    torch.manual_seed(0)
    memory = GANMemory.default()
    replay = GANMemoryReplayPlugin(memory, iterations=2, batch_size=4, replay_size=6, seed=3)
    recorder = _Recorder()
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1, eval_mb_size=64,
                     device="cpu", plugins=[replay, recorder], evaluator=None)
    bench = _split()
    seen_first = None
    for k, experience in enumerate(bench.train_stream):
        strategy.train(experience)
        if k == 0:
            assert memory.tasks == ["experience0"]
            assert replay.class_map == {"experience0": [0, 1]}
            seen_first = memory.sample("experience0", 4, seed=11)
    assert memory.tasks == ["experience0", "experience1"]
    assert replay.class_map["experience1"] == [7, 9]
    # learning experience 1 did not change experience 0 (no forgetting)
    assert torch.equal(memory.sample("experience0", 4, seed=11), seen_first)

    first = [b for b in recorder.batches if b[0] == 0]
    second = [b for b in recorder.batches if b[0] == 1]
    assert first and second
    for _, x, y, t in first:  # no replay before anything was learned
        assert set(y.tolist()) <= {0, 1} and x.shape[0] == y.shape[0] == t.shape[0] <= 16
    for _, x, y, t in second:
        real = y.shape[0] - 6
        assert set(y[:real].tolist()) <= {7, 9}, "the real part is experience 1"
        assert set(y[real:].tolist()) <= {0, 1}, "replayed samples carry experience 0's global classes"
        assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
        assert 0 <= float(x[real:].min()) and float(x[real:].max()) <= 1, "replay is mapped back to [0, 1]"
        assert torch.equal(t, torch.zeros_like(t))
    replayed = torch.cat([y[y.shape[0] - 6:] for _, x, y, t in second])
    assert set(replayed.tolist()) == {0, 1}, "both classes of experience 0 are replayed"


def test_plugin_rejects_bad_settings():
    memory = GANMemory.default()
    with pytest.raises(ValueError, match="replay_size"):
        GANMemoryReplayPlugin(memory, replay_size=0)
    with pytest.raises(ValueError, match="input_range"):
        GANMemoryReplayPlugin(memory, input_range=(1.0, 0.0))
