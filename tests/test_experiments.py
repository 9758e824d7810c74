"""The lifelong experiments' commands in --quick mode: outputs exist and the numbers are sane."""
import json
import math

import pytest
import torch

from gmem.eval import pixel_fid
from gmem.experiments import classification, generation, metrics
from gmem.experiments.classification import SmallCNN, split_tasks
from gmem.experiments.metrics import get_metric, register

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models (conftest.py)


def test_generation_quick(tmp_path):
    out = tmp_path / "gen"
    assert generation.main(["--out", str(out), "--quick", "--iterations", "1", "--eval-samples", "16",
                            "--methods", "gan_memory", "finetune", "--threads", "1"]) == 0
    for name in ("results.json", "results.md", "fig5_samples.png", "fig6_left_quality.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    tasks = res["run"]["settings"]["tasks"]
    assert len(tasks) == 2 and res["run"]["command"].startswith("python -m gmem.experiments.generation --out")
    for method in ("gan_memory", "finetune"):
        for j, task in enumerate(tasks):
            stages = res["scores"][method][task]
            assert sorted(stages) == [str(s) for s in range(j + 1, len(tasks) + 1)]
            assert all(math.isfinite(v) and v >= 0 for v in stages.values())
    # GAN memory: the first task's samples are bit-identical after the second stage; fine-tuning's change
    assert res["bit_identical_since_learned"]["gan_memory"][tasks[0]]["2"] is True
    assert res["max_abs_change_since_learned"]["gan_memory"][tasks[0]]["2"] == 0.0
    assert res["bit_identical_since_learned"]["finetune"][tasks[0]]["2"] is False
    assert res["max_abs_change_since_learned"]["finetune"][tasks[0]]["2"] > 0
    assert "pixFID8" in (out / "results.md").read_text()


def test_classification_quick(tmp_path):
    out = tmp_path / "cls"
    assert classification.main(["--out", str(out), "--quick", "--threads", "1"]) == 0
    for name in ("results.json", "results.md", "fig6_right_accuracy.png", "fig12_per_task.png",
                 "replay_gan_memory.png", "replay_mergan_replay.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert set(res["accuracy_seen_classes"]) == set(classification.DEFAULT_METHODS)
    for method, per_stage in res["accuracy_seen_classes"].items():
        assert sorted(per_stage) == ["1", "2"]
        assert all(0.0 <= v <= 1.0 for v in per_stage.values())
        assert sorted(res["accuracy_per_task"][method]["task2"]) == ["2"]


def test_split_tasks_is_a_disjoint_cover():
    labels = torch.arange(10).repeat_interleave(8)
    splits = split_tasks(labels, 2, test_fraction=0.25, seed=1)
    assert [s[0] for s in splits] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    every = torch.cat([torch.cat([s[1], s[2]]) for s in splits])
    assert sorted(every.tolist()) == list(range(80))
    for classes, train, test in splits:
        assert len(test) == 4 and len(train) == 12
        assert set(labels[train].tolist()) == set(classes) == set(labels[test].tolist())
    with pytest.raises(ValueError, match="do not split"):
        split_tasks(torch.arange(3), 2)
    assert SmallCNN()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_metrics_by_name():
    real, fake = torch.rand(40, 3, 8, 8) * 2 - 1, torch.rand(40, 3, 8, 8)
    assert get_metric("pixfid8")(real, fake) == pixel_fid(real, fake)
    assert "proxy" in get_metric("pixfid8").label
    with pytest.raises(KeyError, match="unknown metric"):
        get_metric("no_such_metric")
    m = register("mean_gap", lambda r, f: float((r.mean() - f.mean()).abs()), higher_is_better=False)
    try:
        assert get_metric("mean_gap") is m and m(real, real) == 0.0
    finally:
        metrics._REGISTRY.pop("mean_gap")
