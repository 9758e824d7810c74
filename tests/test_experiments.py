"""The lifelong experiments' commands in --quick mode: outputs exist and the numbers are sane."""
import json
import math

import pytest
import torch

from gmem.eval import pixel_fid
from gmem.experiments import classification, generation, metrics
from gmem.experiments.classification import SmallCNN, split_tasks
from gmem.experiments.metrics import get_metric, register
from gmem.seeding import seeded

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
    # results name the base they were measured on by its weights' hash, in the JSON and the table
    from gmem.models.base import default_base_info
    sha = default_base_info()["sha256"]
    assert res["run"]["base_sha256"] == sha and sha in (out / "results.md").read_text()
    # the methods in two worker processes: the same numbers as one after another
    par = tmp_path / "gen2"
    assert generation.main(["--out", str(par), "--quick", "--iterations", "1", "--eval-samples", "16",
                            "--methods", "gan_memory", "finetune", "--threads", "1", "--workers", "2"]) == 0
    res2 = json.loads((par / "results.json").read_text())
    for key in ("scores", "bit_identical_since_learned", "max_abs_change_since_learned", "near_duplicates",
                "nearest_neighbour_ratio"):
        assert res2[key] == res[key], key
    assert res2["run"]["settings"]["workers"] == 2


def test_generation_reports_fid_and_near_duplicates(tmp_path, monkeypatch):
    from gmem.eval import pixel_features

    seen = []

    def cheap_features(images):  # the Inception network is slow on a CPU: pixel features stand in for it
        seen.append(len(images))
        return pixel_features(images)

    monkeypatch.setattr(generation, "inception_features", cheap_features)
    monkeypatch.setattr(generation, "real_features", cheap_features)
    out = tmp_path / "gen"
    assert generation.main(["--out", str(out), "--quick", "--iterations", "1", "--eval-samples", "16",
                            "--fid-samples", "12", "--methods", "gan_memory", "--threads", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    tasks = res["run"]["settings"]["tasks"]
    assert res["fid_samples"] == 12 and res["run"]["settings"]["fid_samples"] == 12
    fid = res["fid"]["gan_memory"]
    assert sorted(fid[tasks[0]]) == ["1", "2"] and sorted(fid[tasks[1]]) == ["2"]
    assert fid[tasks[0]]["1"] == fid[tasks[0]]["2"]  # GAN memory: the same samples after the second stage
    # the first task's samples did not change in the second stage: its FID is not computed again
    assert seen.count(12) == 2 and all(math.isfinite(v) for s in fid.values() for v in s.values())
    dup = res["near_duplicates"]
    assert set(dup) == {"real", "gan_memory"} and all(0 <= v <= 1 for v in dup["gan_memory"].values())
    spread = res["nearest_neighbour_ratio"]["gan_memory"]
    assert set(spread) == set(tasks) and all(v > 0 for v in spread.values())
    assert "N = 12 samples" in (out / "results.md").read_text()


def test_classification_quick(tmp_path):
    out = tmp_path / "cls"
    assert classification.main(["--out", str(out), "--quick", "--threads", "1"]) == 0
    for name in ("results.json", "results.md", "fig6_right_accuracy.png", "fig12_per_task.png",
                 "replay_gan_memory.png", "replay_mergan_replay.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert set(res["accuracy_seen_classes"]) == set(classification.DEFAULT_METHODS)
    assert set(res["cpu_seconds"]) == set(res["seconds"]) and all(v >= 0 for v in res["cpu_seconds"].values())
    assert res["run"]["settings"]["classifier"] == "small" and len(res["run"]["load_average"]) == 3
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


# ------------------------------------------------------------------ classifiers
def test_resnet18_is_adapted_to_32x32_and_matches_torchvision():
    from gmem.experiments.classifiers import ResNet18, make_classifier

    with seeded(0):
        own = make_classifier("resnet18", 3, 10, prefer_torchvision=False)
    assert isinstance(own, ResNet18)
    assert own.conv1.kernel_size == (3, 3) and own.conv1.stride == (1, 1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    stem = own.relu(own.bn1(own.conv1(x)))
    assert own.layer4(own.layer3(own.layer2(own.layer1(stem)))).shape == (2, 512, 4, 4)  # no max-pool
    assert own(x).shape == (2, 10)
    assert make_classifier("resnet18", 1, 4, prefer_torchvision=False)(torch.zeros(2, 1, 32, 32)).shape == (2, 4)
    with pytest.raises(KeyError, match="unknown classifier"):
        make_classifier("vgg")
    import torchvision  # noqa: F401  (pinned: a checkout without it fails here)
    with seeded(1):
        tv = make_classifier("resnet18", 3, 10)
    assert not isinstance(tv, ResNet18) and isinstance(tv.maxpool, torch.nn.Identity)
    # the same architecture: the same parameter and buffer names and shapes, and the same function
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(tv) == shapes(own)
    own.load_state_dict(tv.state_dict())
    tv.eval(), own.eval()
    with torch.no_grad():
        torch.testing.assert_close(own(x), tv(x))


def test_classification_with_resnet18_records_the_choice(tmp_path):
    out = tmp_path / "cls"
    assert classification.main(["--out", str(out), "--quick", "--methods", "finetune", "--steps", "1",
                                "--steps-batch-size", "4", "--classifier", "resnet18", "--threads", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["run"]["settings"]["classifier"].startswith("resnet18 (")
    assert "no max-pool" in (out / "results.md").read_text()
    with pytest.raises(SystemExit):
        classification.main(["--out", str(out), "--classifier", "vgg"])


# ------------------------------------------------------------------ replay check
class _FixedLogits(torch.nn.Module):
    """A stand-in classifier: returns the given logits whatever the images."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def prepare(self, images):
        return images

    def forward(self, x):
        return self.logits


def test_replay_scores_count_hits_swaps_and_two_way_choices():
    from gmem.experiments.replay_check import scores

    logits = torch.full((4, 10), -5.0)
    logits[0, 2], logits[1, 3], logits[2, 7] = 9.0, 9.0, 9.0   # hit, swapped, outside the task
    logits[2, 2], logits[3, 3] = 1.0, 9.0                      # sample 2: among {2, 3} it picks 2
    labels = torch.tensor([2, 2, 2, 2])                        # all drawn for class 2 of task (2, 3)
    r = scores(_FixedLogits(logits), torch.zeros(4, 1, 2, 2), labels, [2, 3])
    assert r == {"accuracy": 0.25, "accuracy_swapped": 0.5, "in_task": 0.75, "two_way": 0.5, "n": 4}


def test_replay_check_runs_at_tiny_settings(tmp_path):
    from gmem.experiments import replay_check

    r = replay_check.run(tmp_path, task=2, iterations=1, batch_size=4, samples=6, classifier_epochs=1)
    assert r["classes"] == [2, 3] and r["samples"]["n"] == 6 and r["untrained"]["n"] == 6
    for key in ("real_heldout", "samples", "untrained"):
        assert all(0.0 <= r[key][k] <= 1.0 for k in ("accuracy", "accuracy_swapped", "in_task", "two_way"))
    assert (tmp_path / "replay_check.png").stat().st_size > 0
    assert json.loads((tmp_path / "replay_check.json").read_text())["run"]["settings"]["iterations"] == 1
    with pytest.raises(IndexError, match="task must lie in 1..5"):
        replay_check.run(tmp_path, task=6)


def test_replay_of_two_conditional_tasks_draws_each_tasks_classes(monkeypatch):
    # the classification experiment's replay: one mixed batch over earlier conditional tasks; every
    # sample must be its own task's image for its local class, labelled with that class's global id
    from gmem import nn as gnn
    from gmem.memory import GANMemory
    from gmem.memory.replay import ReplayGenerator
    from gmem.models import load_default_base

    memory = GANMemory.from_base(*load_default_base())
    g = torch.Generator().manual_seed(0)
    for name in ("task1", "task2"):
        memory.learn(name, torch.zeros(4, 3, 32, 32), iterations=0, batch_size=4, labels=torch.arange(4) % 2,
                     num_classes=2, progress=False)
        # distinct bias rows per task and class (the base's row 0 repeated until trained)
        state = gnn.style_state_dict(memory.generator, name)
        state["fc.bias"] = state["fc.bias"] + 0.3 * torch.randn(state["fc.bias"].shape, generator=g)
        gnn.load_style_state_dict(memory.generator, name, state)
    class_map = {"task1": [0, 1], "task2": [2, 3]}
    calls = []
    original = memory.sample

    def spy(task, n=None, z=None, seed=None, labels=None, batch_size=64):
        calls.append((list(task), z.clone(), torch.as_tensor(labels).clone()))
        return original(task, n, z=z, seed=seed, labels=labels, batch_size=batch_size)

    monkeypatch.setattr(memory, "sample", spy)
    names = ["task1", "task2"] * 4
    x, y, got_names = ReplayGenerator(memory, class_map=class_map, seed=3).generate_labelled(8, condition=names)
    monkeypatch.undo()
    (tasks, z, local), = calls
    assert got_names == names == tasks
    assert y.tolist() == [class_map[t][int(c)] for t, c in zip(names, local)]
    assert set(local.tolist()) == {0, 1}
    for i, t in enumerate(names):
        one = memory.sample(t, z=z[i:i + 1], labels=local[i:i + 1])
        torch.testing.assert_close(x[i:i + 1], one, rtol=0, atol=1e-5)
        other = memory.sample(t, z=z[i:i + 1], labels=1 - local[i:i + 1])  # the other class differs
        assert (other - one).abs().max() > 1e-3


def test_lr_sweep_ranks_rates_and_resumes(tmp_path, monkeypatch):
    import gmem.eval
    from gmem.eval import pixel_features
    from gmem.experiments import lr_sweep

    calls = []

    def cheap_features(images, **kwargs):  # the Inception network is slow on a CPU
        calls.append(len(images))
        return pixel_features(images)

    monkeypatch.setattr(gmem.eval, "inception_features", cheap_features)
    monkeypatch.setattr(gmem.eval, "real_features", cheap_features)
    out = tmp_path / "sweep"
    args = ["--out", str(out), "--lrs", "gan_memory=1e-4,1e-3", "finetune=1e-4", "--seeds", "0", "1",
            "--iterations", "1", "--batch-size", "4", "--fid-samples", "10"]
    assert lr_sweep.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    # 3 rates x 2 seeds, and the base itself (no training) on each seed's latents
    assert len(res["runs"]) == 8 and len((out / "runs.jsonl").read_text().splitlines()) == 8
    assert sorted(r["seed"] for r in res["runs"] if r["method"] == "source") == [0, 1]
    assert "source" not in res["best_lr"] and "(base, no training)" in (out / "results.md").read_text()
    table = res["table"]["gan_memory"]
    assert set(table) == {"0.0001", "0.001"} and all(len(v["fid"]["values"]) == 2 for v in table.values())
    best = min(table, key=lambda lr: table[lr]["fid"]["mean"])
    assert res["best_lr"]["gan_memory"] == float(best) and res["best_lr"]["finetune"] == 1e-4
    assert all(0 < r["nn_ratio"] and 0 <= r["near_duplicates"] <= 1 for r in res["runs"])
    text = (out / "results.md").read_text()
    assert "**best**" in text and "N=10" in text
    # a second call finds every run done: nothing is trained again, the summary is the same
    calls.clear()
    with (out / "runs.jsonl").open("a") as f:
        f.write('{"method": "gan_memory", "lr"')  # a line cut by a crash is ignored
    assert lr_sweep.main(args) == 0
    assert calls == [] and json.loads((out / "results.json").read_text())["best_lr"] == res["best_lr"]


def test_base_transfer_ranks_bases_by_what_is_learned_from_them(tmp_path, monkeypatch):
    import gmem.eval
    from gmem.eval import pixel_features
    from gmem.experiments import base_transfer
    from gmem.models import default_base_info, load_default_base, save_base

    scored = []

    def cheap_features(images, **kwargs):  # the Inception network is slow on a CPU
        scored.append(len(images))
        return pixel_features(images)

    monkeypatch.setattr(gmem.eval, "inception_features", cheap_features)
    monkeypatch.setattr(gmem.eval, "real_features", lambda images, **kwargs: pixel_features(images))
    # a second candidate: the embedded base with its generator's weights disturbed (a worse base)
    G, D = load_default_base()
    with torch.no_grad():
        for p in G.parameters():
            p.add_(0.5 * torch.randn_like(p) * p.std().nan_to_num())
    other = tmp_path / "other"
    save_base(G, D, other)
    out = tmp_path / "bases"
    args = ["--out", str(out), "--bases", "embedded", f"disturbed={other}", "--tasks", "emoji", "fashion_mnist",
            "--seeds", "0", "1", "--iterations", "1", "--batch-size", "4", "--fid-samples", "10"]
    assert base_transfer.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["runs"]) == 16  # 2 bases x 2 tasks x 2 seeds x (the base's own samples, after learning)
    by_sha = {b["sha256"]: b for b in res["bases"]}
    assert len(by_sha) == 2 and all(set(b["learned"]) == {"emoji", "fashion_mnist"} for b in res["bases"])
    for b in res["bases"]:
        per_seed = [b["per_seed"][s][t] for s in ("0", "1") for t in ("emoji", "fashion_mnist")]
        assert b["mean_learned"] == pytest.approx(sum(per_seed) / 4, abs=0.02)  # (of rounded per-task means)
        assert b["learned"]["emoji"] == pytest.approx((b["per_seed"]["0"]["emoji"] + b["per_seed"]["1"]["emoji"]) / 2,
                                                      abs=0.01)
    assert res["best"]["sha256"] == min(res["bases"], key=lambda b: b["mean_learned"])["sha256"]
    assert res["best"]["label"] == "embedded"  # the disturbed base transfers worse
    assert {b["label"] for b in res["bases"]} == {"embedded", "disturbed"}
    assert by_sha[res["best"]["sha256"]]["iterations"] == default_base_info()["info"]["iterations"]
    assert "**best**" in (out / "results.md").read_text()
    assert scored == [10] * 16
    scored.clear()  # resumed: nothing trained or scored again
    assert base_transfer.main(args) == 0
    assert json.loads((out / "results.json").read_text())["best"]["sha256"] == res["best"]["sha256"]
    assert scored == [] and len((out / "runs.jsonl").read_text().splitlines()) == 16
    with pytest.raises(FileNotFoundError, match="base config not found"):  # not a base directory
        base_transfer.main(["--out", str(out), "--bases", str(tmp_path / "missing")])
