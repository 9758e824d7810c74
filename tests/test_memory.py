"""gmem.GANMemory: learning only touches the new task, resume, sampling, persistence (tiny 32x32 nets)."""
import json
import os
import time

import pytest
import torch

import gmem.nn as gnn
from gmem import GANMemory
from gmem.data import DataError
from gmem.models import CheckpointError, Discriminator, Generator
from gmem.store import TaskFileError


def tiny_base(seed=0, size=32, nf=4):
    torch.manual_seed(seed)
    return Generator(size, nf, z_dim=8, embed_size=4), Discriminator(size, nf)


def images(n=12, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.fixture
def mem():
    return GANMemory.from_base(*tiny_base())


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_conversion_follows_the_paper(mem):
    assert set(mem.g_converted) == {"fc"} | {f"resnet_{k}_0.conv_{j}" for k in range(4) for j in (0, 1)}
    assert set(mem.d_converted) == {f"resnet_{k}_0.conv_{j}" for k in range(4) for j in (0, 1)}
    names = dict(mem.generator.named_modules())
    assert type(names["conv_img"]) is torch.nn.Conv2d and type(names["resnet_0_0.conv_s"]) is torch.nn.Conv2d
    assert mem.tasks == [] and gnn.list_tasks(mem.generator) == ["source"]
    counts = mem.parameter_counts()
    assert 0 < counts["generator_style_ratio"] < 1
    mem.learn("a", images(), iterations=1, batch_size=4, seed=0, progress=False)
    assert counts["generator_style"] == gnn.count_style_parameters(mem.generator, "a")
    assert counts["discriminator_style"] == gnn.count_style_parameters(mem.discriminator, "a")


def test_learning_changes_only_the_new_task(mem):
    mem.learn("a", images(), iterations=2, batch_size=4, seed=0, progress=False)
    g0, d0 = snapshot(mem.generator), snapshot(mem.discriminator)
    fc_a = {k: v.clone() for k, v in mem.registry.heads["a"].state_dict().items()}
    mem.learn("b", images(seed=1), iterations=3, batch_size=4, seed=1, progress=False)
    g1, d1 = snapshot(mem.generator), snapshot(mem.discriminator)
    changed_g = {k for k in g0 if not torch.equal(g0[k], g1[k])}
    changed_d = {k for k in d0 if not torch.equal(d0[k], d1[k])}
    assert changed_g == set() and changed_d == set()          # nothing that existed before moved
    new_g = set(g1) - set(g0)
    assert new_g and all(".styles.b." in k for k in new_g)    # task b's style sets, keyed by name
    assert all(torch.equal(v, mem.registry.heads["a"].state_dict()[k]) for k, v in fc_a.items())
    # b's parameters did train
    b_state = gnn.style_state_dict(mem.generator, "b")
    src = gnn.style_state_dict(mem.generator, "source")
    assert any(not torch.equal(b_state[k], src[k]) for k in b_state)
    assert mem.tasks == ["a", "b"] and mem.records["b"]["metrics"]["iterations_done"] == 3


def test_no_forgetting_bit_identical_samples(mem):
    mem.learn("a", images(), iterations=2, batch_size=4, seed=0, progress=False)
    before = mem.sample("a", 6, seed=7)
    source = mem.sample("source", 6, seed=7)
    mem.learn("b", images(seed=3), iterations=2, batch_size=4, seed=2, progress=False)
    assert torch.equal(before, mem.sample("a", 6, seed=7))
    assert torch.equal(source, mem.sample("source", 6, seed=7))
    G, _ = tiny_base()
    with torch.no_grad():
        assert torch.equal(source, G.eval()(mem.latents(6, seed=7)))  # the source is the base bit for bit


def test_sample_shapes_seeds_and_errors(mem):
    mem.learn("a", images(), iterations=1, batch_size=4, seed=0, progress=False)
    x = mem.sample("a", 5, seed=1)
    assert x.shape == (5, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, mem.sample("a", 5, seed=1)) and not torch.equal(x, mem.sample("a", 5, seed=2))
    assert torch.equal(x, mem.sample("a", z=mem.latents(5, seed=1)))
    assert torch.equal(mem.sample(1, 5, seed=1), x)
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        mem.sample("nope", 2)
    with pytest.raises(ValueError, match="z must be"):
        mem.sample("a", z=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="unconditional"):
        mem.sample("a", 2, labels=[1, 1])


def test_mixed_task_sampling_equals_per_task(mem):
    mem.learn("a", images(), iterations=2, batch_size=4, seed=0, progress=False)
    labels = torch.arange(12) % 3
    mem.learn("c", images(seed=4), iterations=2, batch_size=4, seed=1, labels=labels, progress=False)
    tasks = ["a", "c", "source", "c", "a", "source"]
    z = mem.latents(6, seed=3)
    ys = torch.tensor([0, 2, 0, 1, 0, 0])
    mixed = mem.sample(tasks, z=z, labels=ys)
    # sample_mixed is the same call as sample(list): check it against the per-task samples itself,
    # in another order (the grouping must write every sample back to its own row)
    perm = [3, 0, 5, 1, 4, 2]
    mixed_perm = mem.sample_mixed([tasks[i] for i in perm], z=z[perm], labels=ys[perm])
    for i, t in enumerate(tasks):
        one = mem.sample(t, z=z[i:i + 1], labels=ys[i:i + 1] if t == "c" else None)
        # mixed and per-task batches run the same float32 ops in other groupings: rounding only
        torch.testing.assert_close(mixed[i:i + 1], one, rtol=0, atol=1e-5)
        torch.testing.assert_close(mixed_perm[perm.index(i)][None], one, rtol=0, atol=1e-5)


def test_conditional_task(mem):
    labels = torch.arange(12) % 4
    idx = mem.learn("digits", images(), iterations=3, batch_size=4, seed=0, labels=labels, progress=False)
    assert idx == 1 and mem.num_classes("digits") == 4
    z = mem.latents(4, seed=0)
    x0 = mem.sample("digits", z=z, labels=torch.zeros(4, dtype=torch.long))
    x3 = mem.sample("digits", z=z, labels=torch.full((4,), 3))
    assert not torch.equal(x0, x3)
    torch.testing.assert_close(x0[:1], mem.sample("digits", z=z[:1], labels=[0]), rtol=0, atol=1e-5)
    with pytest.raises(IndexError, match="class 4 out of range"):
        mem.sample("digits", 2, labels=[0, 4])
    assert mem.parameter_counts("digits")["generator_style"] > mem.parameter_counts()["generator_style"]
    with pytest.raises(ValueError, match="labels"):
        mem.learn("bad", images(), iterations=1, labels=torch.zeros(3, dtype=torch.long), progress=False)


def test_interpolation(mem):
    mem.learn("a", images(), iterations=2, batch_size=4, seed=0, progress=False)
    mem.learn("b", images(seed=5), iterations=2, batch_size=4, seed=1, progress=False)
    strip = mem.interpolate("a", "b", [0.0, 0.5, 1.0], 3, seed=0)
    assert strip.shape == (3, 3, 3, 32, 32)
    torch.testing.assert_close(strip[0], mem.sample("a", 3, seed=0), rtol=0, atol=1e-5)
    torch.testing.assert_close(strip[2], mem.sample("b", 3, seed=0), rtol=0, atol=1e-5)
    # a per-block swap: only the first block mixes; differs from both ends
    swap = mem.interpolate("a", "b", 1.0, 3, seed=0, layers="resnet_0_0.*")
    assert not torch.equal(swap, strip[0]) and not torch.equal(swap, strip[2])
    only_bias = mem.interpolate("a", "b", 1.0, 3, seed=0, groups=["bias"])
    assert only_bias.shape == (3, 3, 32, 32)
    assert "fc" in mem.layer_names()


def test_resume_equals_uninterrupted(tmp_path):
    data = images(16)
    full = GANMemory.from_base(*tiny_base())
    full.learn("t", data, iterations=5, batch_size=4, seed=3, progress=False)

    part = GANMemory.from_base(*tiny_base())

    def crash(it, losses):
        if it == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        part.learn("t", data, iterations=5, batch_size=4, seed=3, out_dir=tmp_path, checkpoint_every=2,
                   callback=crash, progress=False)
    assert part.tasks == [] and gnn.list_tasks(part.generator) == ["source"]  # failed learn leaves no task
    assert (tmp_path / "checkpoint.pt").is_file()
    part.learn("t", data, iterations=5, batch_size=4, seed=3, out_dir=tmp_path, checkpoint_every=2, progress=False)
    for k, v in snapshot(full.generator).items():
        assert torch.equal(v, snapshot(part.generator)[k]), k
    for k, v in snapshot(full.discriminator).items():
        assert torch.equal(v, snapshot(part.discriminator)[k]), k
    assert torch.equal(full.registry.heads["t"].weight, part.registry.heads["t"].weight)
    assert list((tmp_path / "samples").glob("it_*.png"))
    with pytest.raises(CheckpointError, match="another run"):
        GANMemory.from_base(*tiny_base()).learn("t", data, iterations=5, batch_size=4, seed=4,
                                                out_dir=tmp_path, progress=False)


def test_resume_refuses_other_data_and_restart_discards(tmp_path):
    """Issue 12: an interrupted task relearned from other data must not resume the old checkpoint."""
    from gmem.training import ResumeMismatch

    def crash(it, losses):
        if it == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        GANMemory.from_base(*tiny_base()).learn("t", images(8), iterations=3, batch_size=4, seed=3, out_dir=tmp_path,
                                                checkpoint_every=1, callback=crash, progress=False)
    other = images(8, seed=9)
    mem = GANMemory.from_base(*tiny_base())
    with pytest.raises(ResumeMismatch, match="data=") as err:
        mem.learn("t", other, iterations=3, batch_size=4, seed=3, out_dir=tmp_path, progress=False)
    assert "settings" not in str(err.value) and "restart" in str(err.value) and mem.tasks == []
    mem.learn("t", other, iterations=3, batch_size=4, seed=3, out_dir=tmp_path, progress=False, restart=True)
    fresh = GANMemory.from_base(*tiny_base())
    fresh.learn("t", other, iterations=3, batch_size=4, seed=3, progress=False)
    assert torch.equal(mem.sample("t", 2, seed=0), fresh.sample("t", 2, seed=0))


def test_save_load_round_trip_and_lazy_loading(mem, tmp_path):
    mem.learn("a", images(), iterations=2, batch_size=4, seed=0, progress=False)
    mem.learn("c", images(seed=2), iterations=2, batch_size=4, seed=1, labels=torch.arange(12) % 2, progress=False)
    mem.set_metric("a", "score", 1.5)
    xa, xc = mem.sample("a", 4, seed=0), mem.sample("c", 4, seed=0)
    mem.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["a", "c"] and manifest["base"]["sha256"] == mem.base_hash
    assert manifest["tasks"][0]["metrics"]["score"] == 1.5 and manifest["tasks"][1]["num_classes"] == 2
    assert manifest["tasks"][0]["training"]["seed"] == 0
    loaded = GANMemory.load(tmp_path)
    assert loaded.tasks == ["a", "c"] and loaded.loaded_tasks == []        # nothing read yet
    assert torch.equal(loaded.sample("a", 4, seed=0), xa) and loaded.loaded_tasks == ["a"]
    assert torch.equal(loaded.sample("c", 4, seed=0), xc)
    assert torch.equal(loaded.discriminator.fc.weight, mem.discriminator.fc.weight)
    assert torch.equal(loaded.registry.heads["c"].weight, mem.registry.heads["c"].weight)
    # the custom base was stored once and is checked
    assert (tmp_path / "base" / "base.safetensors").is_file()


def test_adding_a_task_never_rewrites_other_files(mem, tmp_path):
    mem.learn("a", images(), iterations=1, batch_size=4, seed=0, progress=False)
    mem.save(tmp_path)
    file_a = next((tmp_path / "tasks").glob("a-*.safetensors"))
    base_file = tmp_path / "base" / "base.safetensors"
    stamps = {file_a: file_a.stat().st_mtime_ns, base_file: base_file.stat().st_mtime_ns}
    time.sleep(0.01)
    loaded = GANMemory.load(tmp_path)
    loaded.learn("b", images(seed=1), iterations=1, batch_size=4, seed=1, progress=False)
    assert loaded.loaded_tasks == ["b"]                 # a was never read
    loaded.save(tmp_path)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "tasks").iterdir()) == ["a", "b"]
    assert GANMemory.load(tmp_path).tasks == ["a", "b"]


def test_crash_while_saving_leaves_old_memory_intact(mem, tmp_path, monkeypatch):
    mem.learn("a", images(), iterations=1, batch_size=4, seed=0, progress=False)
    xa = mem.sample("a", 3, seed=0)
    mem.save(tmp_path)
    mem.learn("b", images(seed=1), iterations=1, batch_size=4, seed=1, progress=False)
    with torch.no_grad():  # change a too, so that saving would have to write a new file for it
        gnn.style_parameters(mem.generator, "a")[0].add_(1.0)
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        mem.save(tmp_path)
    monkeypatch.undo()
    assert calls and not list(tmp_path.rglob("*.tmp"))
    old = GANMemory.load(tmp_path)
    assert old.tasks == ["a"] and torch.equal(old.sample("a", 3, seed=0), xa)


def test_damaged_and_missing_task_files_name_themselves(mem, tmp_path):
    for i, name in enumerate(("a", "b", "c")):
        mem.learn(name, images(seed=i), iterations=1, batch_size=4, seed=i, progress=False)
    xs = {t: mem.sample(t, 2, seed=0) for t in mem.tasks}
    mem.save(tmp_path)
    file_a = next((tmp_path / "tasks").glob("a-*.safetensors"))
    file_b = next((tmp_path / "tasks").glob("b-*.safetensors"))
    data = bytearray(file_a.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file_a.write_bytes(bytes(data))
    file_b.unlink()
    loaded = GANMemory.load(tmp_path)
    with pytest.raises(TaskFileError, match=file_a.name):
        loaded.sample("a", 2, seed=0)
    with pytest.raises(TaskFileError, match="missing.*" + file_b.name):
        loaded.sample("b", 2, seed=0)
    assert torch.equal(loaded.sample("c", 2, seed=0), xs["c"])      # the others stay usable
    report = loaded.verify()
    assert report["c"] is None and file_a.name in report["a"] and file_b.name in report["b"]
    with pytest.warns(UserWarning) as record:
        eager = GANMemory.load(tmp_path, lazy=False)
    messages = " ".join(str(w.message) for w in record)
    assert file_a.name in messages and file_b.name in messages
    assert eager.loaded_tasks == ["c"]
    # a damaged manifest is named too
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json"):
        GANMemory.load(tmp_path)


def test_other_base_is_rejected(mem, tmp_path):
    mem.learn("a", images(), iterations=1, batch_size=4, seed=0, progress=False)
    mem.save(tmp_path)
    G, D = tiny_base(seed=1)
    from gmem.models import save_base
    save_base(G, D, tmp_path / "base", dtype=torch.float32)
    with pytest.raises(CheckpointError, match="different|base"):
        GANMemory.load(tmp_path)


def test_data_errors(mem, tmp_path):
    with pytest.raises(DataError, match="wrong resolution"):
        mem.learn("a", torch.zeros(4, 3, 16, 16), iterations=1, progress=False)
    with pytest.raises(DataError, match="not found"):
        mem.learn("a", str(tmp_path / "missing"), iterations=1, progress=False)
    with pytest.raises(ValueError, match="source"):
        mem.learn("source", images(), iterations=1, progress=False)
    mem.learn("a", images(), iterations=1, batch_size=4, seed=0, progress=False)
    with pytest.raises(ValueError, match="exists already"):
        mem.learn("a", images(), iterations=1, progress=False)
    # a folder of images (another size) is resized
    from PIL import Image
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 80, 10, 200)).save(tmp_path / f"{i}.png")
    mem.learn("folder", str(tmp_path), iterations=1, batch_size=2, seed=0, progress=False)
    assert mem.tasks == ["a", "folder"]


def test_default_memory():  # the embedded base is committed: a checkout without it fails here
    mem = GANMemory.default()
    assert mem.tasks == [] and mem.base_source["kind"] == "default"
    assert mem.sample("source", 2, seed=0).shape == (2, 3, mem.size, mem.size)


def test_paper_configuration_one_step():
    """The paper's 256px / nf 64 GP-GAN converts and takes one learning step on CPU (batch 1)."""
    torch.manual_seed(0)
    G, D = Generator(256, 64, z_dim=256, embed_size=256), Discriminator(256, 64)
    mem = GANMemory.from_base(G, D)
    del G, D
    counts = mem.parameter_counts()
    assert 0.05 < counts["generator_style_ratio"] < 0.35
    mem.learn("faces", images(2, size=256), iterations=1, batch_size=1, seed=0, progress=False)
    assert mem.tasks == ["faces"] and mem.records["faces"]["metrics"]["iterations_done"] == 1


def test_memory_on_the_default_base_refers_to_it_by_hash(tmp_path, monkeypatch):
    import gmem.memory.gan_memory as memory_module
    import gmem.memory.persist as persist_module
    import gmem.models as models_module

    state = {"seed": 0}
    for module in (memory_module, persist_module):  # GANMemory.default, GANMemory.load
        monkeypatch.setattr(module, "load_default_base", lambda: tiny_base(state["seed"]))
    monkeypatch.setattr(models_module, "default_base_info", lambda: {"sha256": "f" * 64})
    monkeypatch.setattr(memory_module, "default_base_info", lambda: {"sha256": "f" * 64})
    mem = GANMemory.default()
    mem.learn("a", images(), iterations=1, batch_size=4, seed=0, progress=False)
    x = mem.sample("a", 2, seed=0)
    mem.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["base"]["kind"] == "default" and not (tmp_path / "base").exists()
    assert torch.equal(GANMemory.load(tmp_path).sample("a", 2, seed=0), x)
    state["seed"] = 1  # the embedded base changed: the memory's tasks no longer fit
    with pytest.raises(CheckpointError, match="base"):
        GANMemory.load(tmp_path)


def test_conditional_task_from_class_folders_keeps_class_names(mem, tmp_path):
    from PIL import Image

    for k, cls in enumerate(("cats", "dogs")):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (32, 32), (100 * k, 50 * i, 30)).save(tmp_path / cls / f"{i}.png")
    mem.learn("pets", str(tmp_path), iterations=1, batch_size=2, seed=0, labels=True, progress=False)
    assert mem.num_classes("pets") == 2 and mem.records["pets"]["classes"] == ["cats", "dogs"]
    mem.save(tmp_path / "mem")
    assert GANMemory.load(tmp_path / "mem").records["pets"]["classes"] == ["cats", "dogs"]


# The names gmem.nn and GANMemory must both accept (one task-name codec, gmem.nn.bank.encode_task):
# attributes of nn.Module / nn.ModuleDict, a state-dict separator, the codec's escape, unicode.
AWKWARD_NAMES = ["keys", "training", "forward", "state_dict", "a.b", "100%", "ünïcødé", "white space"]


def test_awkward_task_names_work_in_gmem_nn_and_in_a_memory(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    gnn.convert(net)
    mem = GANMemory.from_base(*tiny_base())
    for k, name in enumerate(AWKWARD_NAMES, 1):
        assert gnn.add_task(net, name) == k
        assert mem.learn(name, images(), iterations=1, batch_size=4, seed=k, progress=False) == k
    assert gnn.list_tasks(net) == ["source", *AWKWARD_NAMES]
    assert mem.tasks == AWKWARD_NAMES and mem.registry.heads.names() == AWKWARD_NAMES
    samples = {name: mem.sample(name, 2, seed=0) for name in AWKWARD_NAMES}
    mem.save(tmp_path / "m")
    again = GANMemory.load(tmp_path / "m")
    assert again.tasks == AWKWARD_NAMES
    assert all(torch.equal(again.sample(name, 2, seed=0), x) for name, x in samples.items())
    again.remove("keys")
    assert again.tasks == [n for n in AWKWARD_NAMES if n != "keys"] and "keys" not in again.registry.heads
