"""The fc's mFiLM vectors in the knowledge base, layers stored dense when factors cost more than naive,
``store.repair`` with compressed tasks, and the per-block truncation study (Figure 4b).

Tasks are made by perturbing instead of training (as in test_compress_memory): the trained residuals get
a random low-rank change, so the energy rule has something to keep.
"""
from __future__ import annotations

import json
import shutil

import compress_tasks
import pytest
import torch
from compress_tasks import add_naive
from torch import nn

import gmem
from gmem.compress import knowledge
from gmem.compress.knowledge import DEFAULT_LAYERS, RELEASED_LAYERS, CompressionSettings
from gmem.compress.layers import parse_layers, select_layers
from gmem.store import Store
from gmem.store import files as store_files


def add_compressed(mem, name, seed, keep=0.9, layers=DEFAULT_LAYERS, rank=2):
    return compress_tasks.add_compressed(mem, name, seed, keep, layers, rank)


def _layer(mem, name):
    return dict(gmem.nn.modulated_layers(mem.generator))[name]


@pytest.fixture(scope="module")
def fc_mem():
    mem = gmem.GANMemory.default()
    add_naive(mem, "naive", 0)
    add_compressed(mem, "first", 1)
    z = mem.latents(5, seed=4)
    before = mem.sample("first", z=z)
    fc_cols = [kb.columns()[0].clone() for key, kb in mem.registry.knowledge.bases.items() if key.startswith("fc.")]
    add_compressed(mem, "second", 2)
    return {"mem": mem, "z": z, "first_before": before, "fc_cols": fc_cols}


# ---- the matrix view of a linear layer -------------------------------------------------------------
def test_gpgan_fc_view_and_explicit_shapes():
    G = gmem.GANMemory.default().generator
    fc = _layer_from(G, "fc")
    (name, layer, shape), = select_layers(G, ["fc"])
    assert name == "fc" and shape == (16 * G.nf, G.s0 * G.s0) and shape[0] * shape[1] == fc.out_features
    names = [n for n, _, _ in select_layers(G, DEFAULT_LAYERS)]  # fc and the B0-B3 convs, in the model's order
    assert names[0] == "fc" and len(names) == 9
    assert len(select_layers(G, RELEASED_LAYERS)) == 8
    (_, _, explicit), = select_layers(G, [("fc", (fc.out_features // 64, 64))])
    assert explicit == (fc.out_features // 64, 64)
    with pytest.raises(ValueError, match="has 10 values"):
        select_layers(G, [("fc", (2, 5))])
    with pytest.raises(ValueError, match="is a conv"):
        select_layers(G, [("resnet_0_0.conv_0", (4, 4))])
    with pytest.raises(ValueError, match="select no modulated layer"):
        select_layers(G, ["nothing*"])
    with pytest.raises(ValueError, match="neither a glob"):
        parse_layers(["fc", 3])
    with pytest.raises(ValueError, match="positive ints"):
        CompressionSettings(layers=[("fc", (0, 8192))])
    assert CompressionSettings(layers=[("fc", (512, 16))]).to_dict()["layers"] == [["fc", [512, 16]]]


def _layer_from(G, name):
    return dict(gmem.nn.modulated_layers(G))[name]


def test_general_linear_needs_an_explicit_view():
    model = nn.Sequential(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 6))
    gmem.nn.convert(model)
    with pytest.raises(ValueError, match=r"no matrix view.*\('0', \(rows, cols\)\).*12"):
        select_layers(model, ["0"])
    (name, _, shape), = select_layers(model, [("0", (4, 3))])
    assert (name, shape) == ("0", (4, 3))


def test_explicit_view_trains_and_stores_a_general_linear():
    model = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 6))
    gmem.nn.convert(model)
    gmem.nn.add_task(model, "t")
    kb = knowledge.Knowledge()
    settings = CompressionSettings(layers=[("0", (16, 4))], keep=0.5)
    styles = knowledge.begin_task(model, "t", kb, settings)
    assert [tuple(s.shape) for s in styles] == [(16, 4), (16, 4)]
    info = knowledge.finish_task(model, "t", kb, settings)
    assert info["0.gamma"]["new_rank"] < 4 and not info["0.gamma"].get("dense")
    layer, index = model[0], gmem.nn.task_index(model, "t")
    assert layer.entry_kind(index) == "lowrank"
    x = torch.randn(7, 3)
    with gmem.nn.use_task(model, "t"):
        compressed = model(x)
    entry = layer.entry(index)
    layer.set_entry(index, gmem.nn.LinearStyle(kb.bases["0.gamma"].dense("t").reshape(-1),
                                               kb.bases["0.beta"].dense("t").reshape(-1), entry.bias.detach().clone()))
    with gmem.nn.use_task(model, "t"):
        torch.testing.assert_close(model(x), compressed, rtol=0, atol=1e-6)


# ---- a memory with fc compressed -------------------------------------------------------------------
def test_fc_compressed_entry_samples_as_its_densified_form(fc_mem):
    mem, z = fc_mem["mem"], fc_mem["z"]
    fc = _layer(mem, "fc")
    index = gmem.nn.task_index(mem.generator, "second")
    assert fc.entry_kind(index) == "lowrank"
    kb = mem.registry.knowledge.bases["fc.gamma"]
    assert tuple(kb.shape) == (16 * mem.generator.nf, mem.generator.s0 ** 2)
    gamma = fc.style(index)[0]
    assert isinstance(gamma, torch.Tensor) and gamma.shape == (fc.out_features,)
    dense64 = (kb.express("second").u.double() * kb.express("second").s.double()) @ kb.express("second").v.double().T
    torch.testing.assert_close(gamma.double(), dense64.reshape(-1), rtol=1e-5, atol=1e-6)
    compressed = mem.sample("second", z=z)
    entry = fc.entry(index)
    dense = gmem.nn.LinearStyle(*(t.detach().clone() for t in (entry.gamma, entry.beta, entry.bias)))
    fc.set_entry(index, dense)
    try:
        densified = mem.sample("second", z=z)
    finally:
        fc.set_entry(index, entry)
    torch.testing.assert_close(compressed, densified, rtol=0, atol=1e-5)
    mixed = mem.sample(["naive", "second", "first", "second", "naive"], z=z)
    torch.testing.assert_close(mixed[1], compressed[1], rtol=0, atol=1e-5)


def test_fc_base_only_grows_and_earlier_tasks_stay(fc_mem):
    mem = fc_mem["mem"]
    assert torch.equal(mem.sample("first", z=fc_mem["z"]), fc_mem["first_before"])
    now = [kb.columns()[0] for key, kb in mem.registry.knowledge.bases.items() if key.startswith("fc.")]
    for old, new in zip(fc_mem["fc_cols"], now):
        assert torch.equal(new[:, : old.shape[1]], old)
    rec = mem.records["second"]["compression"]
    assert "fc.gamma" in rec["new_ranks"] and rec["dense_layers"] == []
    c = mem.parameter_counts("second")
    fc = _layer(mem, "fc")
    fc_stored = sum(mem.registry.knowledge.bases[f"fc.{g}"].stored_values("second") for g in ("gamma", "beta"))
    assert fc_stored < 2 * fc.out_features
    assert c["generator_stored"] == (c["generator_style"] - mem.registry.knowledge.dense_values("second")
                                     + mem.registry.knowledge.stored_values("second"))


def test_fc_compressed_save_load_bit_identical(fc_mem, tmp_path):
    mem, z = fc_mem["mem"], fc_mem["z"]
    mem.save(tmp_path / "m")
    loaded = gmem.GANMemory.load(tmp_path / "m")
    for t in ("naive", "first", "second"):
        assert torch.equal(loaded.sample(t, z=z), mem.sample(t, z=z))
    assert loaded.parameter_counts("second") == mem.parameter_counts("second")
    shapes = [tuple(m.registry.knowledge.bases["fc.beta"].shape) for m in (loaded, mem)]
    assert shapes[0] == shapes[1]


def test_fc_file_with_a_bad_view_is_refused(fc_mem, tmp_path):
    tensors = fc_mem["mem"].registry.task_tensors("second")
    g_state = {k[2:]: v for k, v in tensors.items() if k.startswith("G.")}
    g_state["fc.lowrank.gamma.v"] = torch.zeros(3, g_state["fc.lowrank.gamma.v"].shape[1])
    fresh = gmem.GANMemory.default()
    for t in ("first",):
        fresh.registry.install(t, fc_mem["mem"].registry.task_tensors(t), None)
    gmem.nn.add_task(fresh.generator, "second")
    with pytest.raises(ValueError, match="fc.lowrank.gamma"):
        knowledge.install_task(fresh.generator, "second", g_state, fresh.registry.knowledge)
    assert "second" not in fresh.registry.knowledge


# ---- never more than naive -------------------------------------------------------------------------
def test_layers_whose_factors_cost_more_are_stored_dense():
    mem = gmem.GANMemory.default()
    add_naive(mem, "t", 5)
    z = mem.latents(3, seed=1)
    before = mem.sample("t", z=z)
    rec = mem.compress("t", keep=1.0, layers=DEFAULT_LAYERS)  # full-rank factors: r (O + I + 1) > O I
    assert set(rec["dense_layers"]) == {n for n, _, _ in select_layers(mem.generator, DEFAULT_LAYERS)}
    assert rec["new_ranks"] == {} and rec["stored_values"] == 0
    c = mem.parameter_counts("t")
    assert c["generator_stored"] == c["generator_style"]
    assert torch.equal(mem.sample("t", z=z), before)  # the dense entries are the task's own
    from gmem.cli.compress import storage_lines

    line = storage_lines([{"name": "t", "generator_style": 10, "generator_stored": 10, "compressed": True,
                           "compression": rec}])[2]
    assert "stored dense" in line and "resnet_0_0.conv_0" in line


def test_training_path_falls_back_to_the_trained_dense_values():
    mem = gmem.GANMemory.default()
    settings = CompressionSettings(keep=1.0)
    mem.registry.add("t", None, compress_tasks.record("t"))
    styles = knowledge.begin_task(mem.generator, "t", mem.registry.knowledge, settings)
    with torch.no_grad():
        for s in styles:
            s.residual.add_(0.01 * torch.randn(s.residual.shape, generator=torch.Generator().manual_seed(0)))
    index = gmem.nn.task_index(mem.generator, "t")
    layer = _layer(mem, "resnet_0_0.conv_0")
    trained = layer.entry(index).gamma.detach().clone()
    info = knowledge.finish_task(mem.generator, "t", mem.registry.knowledge, settings)
    assert all(i["dense"] for i in info.values()) and "t" not in mem.registry.knowledge
    assert layer.entry_kind(index) == "dense" and torch.equal(layer.entry(index).gamma, trained)


def test_mixed_dense_and_compressed_layers_reload(tmp_path):
    mem = gmem.GANMemory.default()
    # at 0.99 the wide convs keep nearly full rank (dense is cheaper), fc's nearly rank-1 vectors do not
    add_compressed(mem, "a", 1, keep=0.99, layers=DEFAULT_LAYERS, rank=2)
    rec = mem.records["a"]["compression"]
    assert "resnet_0_0.conv_0" in rec["dense_layers"] and "fc" not in rec["dense_layers"]
    assert "fc.gamma" in rec["new_ranks"] and "resnet_0_0.conv_0.gamma" not in rec["new_ranks"]
    index = gmem.nn.task_index(mem.generator, "a")
    kinds = {n: m.entry_kind(index) for n, m in gmem.nn.modulated_layers(mem.generator)}
    assert kinds["fc"] == "lowrank" and kinds["resnet_0_0.conv_0"] == "dense"
    c = mem.parameter_counts("a")
    assert c["generator_stored"] <= c["generator_style"]
    z = mem.latents(2, seed=0)
    mem.save(tmp_path / "m")
    assert torch.equal(gmem.GANMemory.load(tmp_path / "m").sample("a", z=z), mem.sample("a", z=z))


# ---- repair --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """naive, first (adds columns), mid and last (add none: the base holds their energy at keep 0.5)."""
    mem = gmem.GANMemory.default()
    add_naive(mem, "naive", 0)
    add_compressed(mem, "first", 1, keep=0.9, layers=RELEASED_LAYERS)
    for i, t in enumerate(("mid", "last")):
        info = add_compressed(mem, t, 2 + i, keep=0.5, layers=RELEASED_LAYERS)
        assert all(v["new_rank"] == 0 for v in info.values())  # the test needs tasks without own columns
    d = tmp_path_factory.mktemp("chain") / "m"
    mem.save(d)
    return mem, d


def _damage(d, task):
    entry = {e["name"]: e for e in json.loads((d / "manifest.json").read_text())["tasks"]}[task]
    path = d / entry["file"]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def test_repair_drops_a_task_without_columns_and_updates_the_knowledge_file(chain, tmp_path):
    mem, src = chain
    d = shutil.copytree(src, tmp_path / "m")
    _damage(d, "mid")
    old = json.loads((d / "manifest.json").read_text())["knowledge"]
    assert set(Store(d).repair()) == {"mid"}
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["knowledge"] != old
    index = store_files.read_knowledge(d, manifest["knowledge"])
    assert all("mid" not in [row[0] for row in m["tasks"]] for m in index["matrices"].values())
    loaded = gmem.GANMemory.load(d)
    assert loaded.tasks == ["naive", "first", "last"]
    z = mem.latents(3, seed=7)
    for t in ("last", "first", "naive"):
        assert torch.equal(loaded.sample(t, z=z), mem.sample(t, z=z))
    assert Store(d).verify_files() == {t: None for t in loaded.tasks}


def test_repair_drops_the_tasks_that_lose_their_columns(chain, tmp_path):
    _, src = chain
    d = shutil.copytree(src, tmp_path / "m")
    _damage(d, "first")
    dropped = Store(d).repair()
    assert set(dropped) == {"first", "mid", "last"}
    assert "basis columns of dropped task 'first'" in dropped["last"]
    manifest = json.loads((d / "manifest.json").read_text())
    assert "knowledge" not in manifest and [e["name"] for e in manifest["tasks"]] == ["naive"]
    assert gmem.GANMemory.load(d).sample("naive", 1, seed=0).shape == (1, 3, 32, 32)


# ---- Figure 4b -------------------------------------------------------------------------------------------
def test_truncation_study(tmp_path):
    from gmem.compress.truncation import plot_truncation, truncation_study, truncation_table

    mem = gmem.GANMemory.default()
    add_naive(mem, "t", 3)
    z = mem.latents(4, seed=0)
    before = mem.sample("t", z=z)
    result = truncation_study(mem, "t", lambda fake: float(fake.double().abs().mean()), fractions=(0.0, 0.5, 1.0),
                              layers=["resnet_3_0.conv_*", "fc"], n=4, seed=0)
    assert torch.equal(mem.sample("t", z=z), before)  # every entry restored
    assert list(result["blocks"]) == ["fc", "resnet_3_0"]
    for b in result["blocks"].values():
        assert b["kept_rank"][0] == 0 and b["kept_rank"][-1] == b["full_rank"]
        assert b["kept_rank"] == sorted(b["kept_rank"])
        assert b["scores"][-1] == pytest.approx(result["intact"], rel=1e-5)  # f = 1 keeps the task
        assert b["scores"][0] != pytest.approx(result["intact"], rel=1e-3)  # f = 0 removes the block's style
    assert "| resnet_3_0 |" in truncation_table(result)
    plot_truncation(result, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="source"):
        truncation_study(mem, "source", float)
    add_compressed(mem, "c", 1, keep=0.9, layers=RELEASED_LAYERS)
    with pytest.raises(ValueError, match="naive task"):
        truncation_study(mem, "c", float, layers=RELEASED_LAYERS)


def test_cli_compress_fc(tmp_path, capsys):
    from gmem.cli import main
    from gmem.cli.compress import compress_layers

    assert compress_layers(None, False) is None
    assert compress_layers(None, True) == list(DEFAULT_LAYERS)
    assert compress_layers(["resnet_3_0.*", "fc"], True) == ["resnet_3_0.*", "fc"]
    mem = gmem.GANMemory.default()
    add_naive(mem, "t", 1)
    mem.save(tmp_path / "m")
    assert main(["compress", str(tmp_path / "m"), "--compress-fc", "--keep", "0.9"]) == 0
    capsys.readouterr()
    loaded = gmem.GANMemory.load(tmp_path / "m")
    assert "fc" in loaded.records["t"]["compression"]["layers"]
    loaded.sample("t", 1, seed=0)
    assert _layer(loaded, "fc").entry_kind(gmem.nn.task_index(loaded.generator, "t")) == "lowrank"
    assert "fc.gamma" in loaded.records["t"]["compression"]["new_ranks"]
    assert main(["info", str(tmp_path / "m")]) == 0
    assert "compressed" in capsys.readouterr().out


def test_cli_learn_compresses_the_fc_unless_told_not_to(tmp_path, capsys):
    """``gmem learn --compress`` compresses B0-B3 and the fc (the default layers); ``--no-compress-fc``
    leaves the fc's gamma/beta dense, as the released code; it needs ``--compress``."""
    import numpy as np

    from gmem.cli import main

    data = tmp_path / "a.npy"
    np.save(data, np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8))
    common = ["--iterations", "1", "--batch-size", "2", "--no-progress", "--no-score"]
    assert main(["learn", str(tmp_path / "m"), "t", str(data), "--compress", *common]) == 0
    assert main(["learn", str(tmp_path / "m"), "u", str(data), "--compress", "--no-compress-fc", *common]) == 0
    loaded = gmem.GANMemory.load(tmp_path / "m")
    assert "fc" in loaded.records["t"]["compression"]["layers"]
    assert "fc" not in loaded.records["u"]["compression"]["layers"]
    for task, kind in (("t", "lowrank"), ("u", "dense")):
        loaded.sample(task, 1, seed=0)  # (tasks are installed in the model on first use)
        assert _layer(loaded, "fc").entry_kind(gmem.nn.task_index(loaded.generator, task)) == kind
    fc_styles = 2 * _layer(loaded, "fc").out_features  # gamma and beta, dense in "u"
    assert loaded.parameter_counts("u")["generator_stored"] > fc_styles
    capsys.readouterr()
    assert main(["learn", str(tmp_path / "m"), "v", str(data), "--no-compress-fc", *common]) == 1
    assert "--no-compress-fc applies with --compress only" in capsys.readouterr().err
