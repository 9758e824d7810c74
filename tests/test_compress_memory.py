"""Compressed tasks in a GAN memory: sampling through the low-rank factors, growth of the knowledge
base, persistence (knowledge-base file + task files), damaged files, removal, mixed batches, CLI.

Tasks are made by perturbing instead of training (training is covered by one tiny ``learn`` run):
each compressed task's residual gets a random low-rank update, so the energy rule has something to keep.
"""
from __future__ import annotations

import json

import pytest
import torch
from compress_tasks import add_compressed, add_naive

import gmem
from gmem.nn.lowrank import stack_styles
from gmem.ops import LowRank
from gmem.store import Store
from gmem.store import files as store_files

TASKS = ["naive", "first", "second"]


@pytest.fixture(scope="module")
def built():
    mem = gmem.GANMemory.default()
    add_naive(mem, "naive", 0)
    info_first = add_compressed(mem, "first", 1)
    z = mem.latents(6, seed=3)
    before = mem.sample("first", z=z)
    columns = {k: (kb.columns()[0].clone(), kb.columns()[1].clone()) for k, kb in mem.registry.knowledge.bases.items()}
    info_second = add_compressed(mem, "second", 2)
    return {"mem": mem, "z": z, "first_before": before, "columns": columns, "info": (info_first, info_second)}


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    directory = tmp_path_factory.mktemp("compressed") / "mem"
    built["mem"].save(directory)
    return directory


def test_compressed_sampling_uses_factors_and_equals_densified(built):
    mem, z = built["mem"], built["z"]
    layer = dict(gmem.nn.modulated_layers(mem.generator))["resnet_0_0.conv_0"]
    index = gmem.nn.task_index(mem.generator, "second")
    assert isinstance(layer.style(index)[0], LowRank) and layer.entry_kind(index) == "lowrank"
    fc = dict(gmem.nn.modulated_layers(mem.generator))["fc"]
    assert fc.entry_kind(index) == "dense"
    with torch.no_grad():
        x = mem.sample("second", z=z)
        with gmem.nn.interpolate(mem.generator, "second", "second", 0.0):  # runs the densified style sets
            dense = mem.generator(z)
    torch.testing.assert_close(x, dense, rtol=0, atol=2e-5)


def test_earlier_task_bit_identical_and_base_only_grows(built):
    mem = built["mem"]
    assert torch.equal(mem.sample("first", z=built["z"]), built["first_before"])
    for key, (L, R) in built["columns"].items():
        kb = mem.registry.knowledge.bases[key]
        L2, R2 = kb.columns()
        assert L2.shape[1] >= L.shape[1]
        assert torch.equal(L2[:, : L.shape[1]], L) and torch.equal(R2[:, : R.shape[1]], R)
        assert kb.tasks == ["first", "second"]


def test_stored_counts(built):
    mem = built["mem"]
    naive = mem.parameter_counts("naive")
    assert naive["generator_stored"] == naive["generator_style"]
    for task in ("first", "second"):
        c = mem.parameter_counts(task)
        k = mem.registry.knowledge
        assert c["generator_stored"] == c["generator_style"] - k.dense_values(task) + k.stored_values(task)
        assert c["generator_stored"] < c["generator_style"]
    # the second task shares the first one's columns: it adds at most the rank-2 changes per matrix
    assert all(i["new_rank"] <= 2 for i in built["info"][1].values())
    assert mem.parameter_counts("second")["generator_stored"] < mem.parameter_counts("first")["generator_stored"]


def test_mixed_batch_equals_per_task(built):
    mem, z = built["mem"], built["z"]
    tasks = ["first", "naive", "second", "source", "second", "first"]
    mixed = mem.sample(tasks, z=z)
    single = torch.cat([mem.sample(t, z=z[i:i + 1]) for i, t in enumerate(tasks)])
    # fp32 rounding through the whole generator (the per-task runs sum in another order)
    torch.testing.assert_close(mixed, single, rtol=0, atol=2e-4)
    only_compressed = mem.sample(["second", "first"], z=z[:2])  # every task compressed: stacked factors
    expected = torch.cat([mem.sample("second", z=z[:1]), mem.sample("first", z=z[1:2])])
    torch.testing.assert_close(only_compressed, expected, rtol=0, atol=2e-4)


def test_stack_styles_pads_and_densifies():
    g = torch.Generator().manual_seed(0)
    a = LowRank(torch.randn(5, 2, generator=g), torch.rand(2, generator=g), torch.randn(4, 2, generator=g))
    b = LowRank(torch.randn(5, 3, generator=g), torch.rand(3, generator=g), torch.randn(4, 3, generator=g))
    stacked = stack_styles([a, b])
    assert isinstance(stacked, LowRank) and stacked.u.shape == (2, 5, 3)
    torch.testing.assert_close(stacked.dense(), torch.stack([a.dense(), b.dense()]))
    d = torch.randn(5, 4, generator=g)
    mixed = stack_styles([a, d])
    assert isinstance(mixed, torch.Tensor)
    torch.testing.assert_close(mixed, torch.stack([a.dense(), d]))


def test_save_load_bit_identical(built, saved):
    mem, z = built["mem"], built["z"]
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["knowledge"]["file"].startswith("knowledge/")
    loaded = gmem.GANMemory.load(saved)
    assert loaded.loaded_tasks == []
    x = loaded.sample("second", z=z)  # loads "first" too: its columns are used
    assert set(loaded.loaded_tasks) == {"first", "second"}
    assert torch.equal(x, mem.sample("second", z=z))
    for t in TASKS:
        assert torch.equal(loaded.sample(t, z=z), mem.sample(t, z=z))
    assert torch.equal(loaded.sample(TASKS * 2, z=z), mem.sample(TASKS * 2, z=z))
    assert loaded.parameter_counts("second") == mem.parameter_counts("second")
    # saving again unchanged rewrites nothing and keeps the same knowledge file
    loaded.save(saved)
    assert json.loads((saved / "manifest.json").read_text())["knowledge"] == manifest["knowledge"]


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damaged_coefficient_file(saved, tmp_path):
    d = _copy(saved, tmp_path / "m")
    entry = {e["name"]: e for e in json.loads((d / "manifest.json").read_text())["tasks"]}["first"]
    path = d / entry["file"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    mem = gmem.GANMemory.load(d)
    with pytest.raises(store_files.TaskFileError, match=entry["file"].split("/")[-1]):
        mem.sample("first", 1, seed=0)
    with pytest.raises(store_files.TaskFileError, match="first"):
        mem.sample("second", 1, seed=0)  # uses the damaged task's columns
    assert mem.sample("naive", 1, seed=0).shape == (1, 3, 32, 32)


def test_damaged_basis_file(saved, tmp_path):
    d = _copy(saved, tmp_path / "m")
    rel = json.loads((d / "manifest.json").read_text())["knowledge"]["file"]
    (d / rel).write_text((d / rel).read_text().replace('"first"', '"frist"'))
    mem = gmem.GANMemory.load(d)
    with pytest.raises(store_files.KnowledgeFileError, match=rel.split("/")[-1]):
        mem.sample("second", 1, seed=0)
    assert mem.sample("naive", 1, seed=0).shape == (1, 3, 32, 32)
    (d / rel).unlink()
    with pytest.raises(store_files.KnowledgeFileError, match="file missing"):
        gmem.GANMemory.load(d).sample("first", 1, seed=0)


def test_remove_refused_while_columns_used(saved, tmp_path):
    d = _copy(saved, tmp_path / "m")
    mem = gmem.GANMemory.load(d)
    with pytest.raises(ValueError, match="second"):
        mem.remove("first")
    assert mem.tasks == TASKS
    with pytest.raises(ValueError, match="second"):
        Store(d).remove_tasks(["first"])
    Store(d).remove_tasks(["second"])
    mem = gmem.GANMemory.load(d)
    assert mem.tasks == ["naive", "first"]
    mem.remove("first")
    mem.save(d)
    assert "knowledge" not in json.loads((d / "manifest.json").read_text())
    assert gmem.GANMemory.load(d).tasks == ["naive"]


def test_posthoc_compress_full_energy(built, tmp_path):
    d = _copy(tmp_path_factory_dir(built, tmp_path), tmp_path / "post")
    mem = gmem.GANMemory.load(d)
    z = built["z"]
    before = mem.sample("naive", z=z)
    record = mem.compress("naive", keep=1.0)
    assert record["max_rel_error"] < 1e-4
    torch.testing.assert_close(mem.sample("naive", z=z), before, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="compressed already"):
        mem.compress("naive")
    mem.save(d)
    again = gmem.GANMemory.load(d)
    assert torch.equal(again.sample("naive", z=z), mem.sample("naive", z=z))
    assert again.sample("second", z=z).shape == before.shape


def tmp_path_factory_dir(built, tmp_path):
    d = tmp_path / "src"
    built["mem"].save(d)
    return d


def test_learn_compress_trains_lam_and_residual(tmp_path):
    mem = gmem.GANMemory.default()
    data = torch.rand(4, 3, 32, 32) * 2 - 1
    mem.learn("t", data, iterations=1, batch_size=2, seed=0, progress=False, compress={"keep": 0.8})
    rec = mem.records["t"]["compression"]
    assert rec["mode"] == "training" and rec["prior_every"] == 10 and rec["keep"] == 0.8
    assert mem.records["t"]["training"]["compression"]["keep"] == 0.8
    c = mem.parameter_counts("t")
    assert c["generator_stored"] < c["generator_style"]
    assert mem.sample("t", 2, seed=0).shape == (2, 3, 32, 32)
    with pytest.raises(TypeError, match="compress"):
        mem.learn("u", data, iterations=0, compress="yes")


def test_cli_compress_and_info(built, tmp_path, capsys):
    from gmem.cli import main

    d = tmp_path / "cli"
    built["mem"].save(d)
    assert main(["compress", str(d), "--keep", "0.9"]) == 0
    assert "compressed 'naive'" in capsys.readouterr().out
    assert main(["info", str(d)]) == 0
    out = capsys.readouterr().out
    assert "Table 1" in out and "stored/naive" in out
    assert out.count("compressed") >= 3
    assert main(["compress", str(d), "nope"]) == 1
