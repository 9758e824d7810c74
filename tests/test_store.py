"""gmem.store: concurrent writers (real processes), content addressing, confinement, GC, repair, old memories."""
import json
import multiprocessing
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from gmem import GANMemory
from gmem.models import CheckpointError, Discriminator, Generator
from gmem.store import LockTimeoutError, ManifestError, Store, TaskConflictError, TaskFileError
from gmem.store import files as store_files

FIXTURE = Path(__file__).parent / "fixtures" / "memory_v1"


def tiny_base(seed=0):
    torch.manual_seed(seed)
    return Generator(32, 4, z_dim=8, embed_size=4), Discriminator(32, 4)


def new_memory(seed=0):
    state = torch.get_rng_state()
    try:
        return GANMemory.from_base(*tiny_base(seed))
    finally:
        torch.set_rng_state(state)


def add_task(mem, name, noise_seed=None):
    """A task without training (iterations=0), optionally made unique by seeded noise on its style values."""
    mem.learn(name, torch.zeros(4, 3, 32, 32), iterations=0, batch_size=2, seed=0, progress=False)
    if noise_seed is not None:
        import gmem.nn as gnn

        g = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for p in gnn.style_parameters(mem.generator, name):
                p.add_(torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------ worker processes (spawn)
def _init_worker():
    torch.set_num_threads(1)


def _writer(directory, name, start_at, noise_seed=None, delay=0.0):
    """Learn ``name`` (no training) on the shared tiny base and save it into ``directory``."""
    if delay:  # widen the window between the manifest read and its replacement
        original = Store._write_manifest
        Store._write_manifest = lambda self, m: (time.sleep(delay), original(self, m))
    mem = new_memory()
    add_task(mem, name, noise_seed)
    time.sleep(max(0.0, start_at - time.time()))
    try:
        mem.save(directory)
        return "saved"
    except TaskConflictError as e:
        return f"conflict: {e}"


def _reader(directory, until):
    """List the memory and read every listed task's file until ``until``; returns (rounds, errors)."""
    rounds, errors = 0, []
    while time.time() < until:
        try:
            manifest = Store(directory).read_manifest()
        except FileNotFoundError:
            continue
        for entry in manifest["tasks"]:
            try:
                store_files.read_task(directory, entry["name"], entry)
            except TaskFileError as e:
                errors.append(str(e))
        rounds += 1
    return rounds, errors


def _task_file_digest(seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {"G.fc.gamma": torch.randn(3, 4, generator=g), "D.x.beta": torch.randn(5, generator=g),
               "Dfc.weight": torch.randn(1, 2, generator=g).half()}
    return store_files.sha256_bytes(store_files.task_bytes(tensors, "t"))


@pytest.fixture(scope="module")
def pool():
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4, initializer=_init_worker) as p:
        p.map(time.sleep, [0.01] * 4)  # all four started and importing before the first timed test
        yield p


# ------------------------------------------------------------------ names and paths
@pytest.mark.parametrize("name", ["", " ", "source", "../x", "a/b", "/abs/path", "a\\b", ".hidden", "a\x00b",
                                  "tab\there", "new\nline", "x" * 129])
def test_bad_task_names_are_refused(name):
    with pytest.raises(ValueError, match="task name"):
        store_files.validate_task_name(name)
    with pytest.raises(ValueError, match="task name"):
        new_memory().learn(name, torch.zeros(2, 3, 32, 32), iterations=0, progress=False)


def test_good_task_names_and_file_names():
    for name in ["emoji", "b c", "Ünïcode ☃", "a..b", "x" * 128, "x.y-z_1"]:
        assert store_files.validate_task_name(name) == name
        rel = store_files.task_file_name(name, "0" * 64)
        assert rel.startswith("tasks/") and "/" not in rel[len("tasks/"):] and ".." not in rel
    with pytest.raises(TypeError):
        store_files.validate_task_name(3)
    assert store_files.run_dir_name("a b") != store_files.run_dir_name("a_b")  # the hash keeps sanitised names apart


def test_task_bytes_are_deterministic_across_processes(pool):
    local = [_task_file_digest(s) for s in (0, 1)]
    assert local[0] != local[1]
    assert pool.map(_task_file_digest, [0, 1, 0, 1]) == local * 2
    from safetensors.torch import load

    g = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(2, 3, generator=g), "a": torch.arange(4), "c": torch.randn(3, generator=g).bfloat16()}
    back = load(store_files.task_bytes(tensors, "t"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_unchanged_task_is_never_rewritten(tmp_path):
    mem = new_memory()
    add_task(mem, "a", 1)
    mem.save(tmp_path)
    entry = json.loads((tmp_path / "manifest.json").read_text())["tasks"][0]
    path = tmp_path / entry["file"]
    os.utime(path, (1, 1))  # any rewrite (or refresh) shows in the mtime
    mem.save(tmp_path)       # same object, task loaded: same bytes, same name
    again = GANMemory.load(tmp_path)
    add_task(again, "b", 2)
    again.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["tasks"][0]["file"] == entry["file"] and manifest["tasks"][0]["sha256"] == entry["sha256"]
    assert store_files.sha256_file(path) == entry["sha256"]
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == sorted(
        Path(e["file"]).name for e in manifest["tasks"])


# ------------------------------------------------------------------ concurrency
@pytest.mark.parametrize("writers", [2, 4])
def test_concurrent_writers_keep_every_task(pool, tmp_path, writers):
    start = time.time() + 1.0
    names = [f"task{i}" for i in range(writers)]
    results = pool.starmap(_writer, [(str(tmp_path), n, start, i, 0.2) for i, n in enumerate(names)])
    assert results == ["saved"] * writers
    loaded = GANMemory.load(tmp_path)
    assert sorted(loaded.tasks) == names
    assert all(e is None for e in loaded.verify().values())
    assert not list(tmp_path.rglob("*.tmp"))


def test_same_name_twice_at_once_second_is_refused(pool, tmp_path):
    start = time.time() + 1.0
    results = pool.starmap(_writer, [(str(tmp_path), "x", start, seed, 0.2) for seed in (1, 2)])
    assert sorted(r.split(":")[0] for r in results) == ["conflict", "saved"]
    assert "another process" in next(r for r in results if r.startswith("conflict"))
    winner = 1 if results[0] == "saved" else 2
    mem = new_memory()
    add_task(mem, "x", winner)
    expected = store_files.sha256_bytes(store_files.task_bytes(mem.task_tensors("x"), "x", mem.records["x"]))
    assert Store(tmp_path).read_manifest()["tasks"][0]["sha256"] == expected


def test_readers_never_see_a_missing_file(pool, tmp_path):
    start = time.time() + 1.0
    writes = [pool.apply_async(_writer, (str(tmp_path), f"w{i}", start + 0.3 * i, i, 0.1)) for i in range(3)]
    rounds, errors = pool.apply(_reader, (str(tmp_path), start + 2.5))
    assert [w.get() for w in writes] == ["saved"] * 3
    assert errors == [] and rounds > 0
    assert sorted(GANMemory.load(tmp_path).tasks) == ["w0", "w1", "w2"]


def test_saves_merge_and_remove_only_their_own_removals(tmp_path):
    mem = new_memory()
    add_task(mem, "a", 1)
    mem.save(tmp_path)
    one, two = GANMemory.load(tmp_path), GANMemory.load(tmp_path)
    add_task(one, "x", 2)
    one.save(tmp_path)
    add_task(two, "y", 3)
    two.save(tmp_path)                     # two never saw x: x stays
    assert GANMemory.load(tmp_path).tasks == ["a", "x", "y"]
    two.remove("a")
    two.save(tmp_path)                     # two removed a: only a goes
    assert GANMemory.load(tmp_path).tasks == ["x", "y"]


def test_lock_timeout_names_the_holder(tmp_path):
    mem = new_memory()
    add_task(mem, "a")
    mem.save(tmp_path)
    with Store(tmp_path).lock():
        t0 = time.monotonic()
        with pytest.raises(LockTimeoutError, match=f"pid {os.getpid()}"):
            Store(tmp_path).remove_tasks(["a"], timeout=0.3)
        assert time.monotonic() - t0 >= 0.3
    assert Store(tmp_path).remove_tasks(["a"], timeout=0.3) == ["a"]


def test_claim_refuses_a_second_learner_of_the_same_name(tmp_path):
    with Store(tmp_path).claim("a"):
        with pytest.raises(TaskConflictError, match="being learned"):
            with Store(tmp_path).claim("a"):
                pass
        with Store(tmp_path).claim("b"):
            pass
    with Store(tmp_path).claim("a"):
        pass


# ------------------------------------------------------------------ confinement, validation
def _saved(tmp_path, names=("a", "b")):
    mem = new_memory()
    for i, n in enumerate(names):
        add_task(mem, n, i)
    mem.save(tmp_path)
    return mem


def _edit_manifest(directory, fn):
    path = directory / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("file,match", [("../outside.safetensors", "outside the memory"),
                                        ("/etc/hostname", "absolute path"),
                                        ("", "relative path")])
def test_manifest_paths_must_stay_inside(tmp_path, file, match):
    _saved(tmp_path)
    (tmp_path.parent / "outside.safetensors").write_bytes(b"x")
    _edit_manifest(tmp_path, lambda m: m["tasks"][0].update(file=file))
    mem = GANMemory.load(tmp_path)
    with pytest.raises(TaskFileError, match=match):
        mem.sample("a", 1, seed=0)
    assert mem.sample("b", 1, seed=0).shape == (1, 3, 32, 32)  # the other task is fine


def test_tasks_symlink_outside_is_refused(tmp_path):
    mem = _saved(tmp_path / "m")
    outside = tmp_path / "elsewhere"
    shutil.move(tmp_path / "m" / "tasks", outside)
    (tmp_path / "m" / "tasks").symlink_to(outside)
    loaded = GANMemory.load(tmp_path / "m")
    assert all("symbolic link" in e for e in loaded.verify().values())
    add_task(mem, "c", 5)
    with pytest.raises(ManifestError, match="symbolic link"):
        mem.save(tmp_path / "m")
    assert sorted(p.name for p in outside.iterdir()) == sorted(Path(e["file"]).name for e in
                                                               Store(tmp_path / "m").read_manifest()["tasks"])


def test_missing_sha256_is_an_error(tmp_path):
    _saved(tmp_path)
    _edit_manifest(tmp_path, lambda m: m["tasks"][0].pop("sha256"))
    report = GANMemory.load(tmp_path).verify()
    assert "sha256" in report["a"] and report["b"] is None


def test_damaged_when_one_hex_digit_of_the_sha256_differs(tmp_path):
    _saved(tmp_path)

    def last_digit_changed(m):
        digest = m["tasks"][0]["sha256"]
        m["tasks"][0]["sha256"] = digest[:-1] + ("0" if digest[-1] != "0" else "1")

    _edit_manifest(tmp_path, last_digit_changed)
    report = GANMemory.load(tmp_path).verify()
    assert "damaged" in report["a"] and report["b"] is None


@pytest.mark.parametrize("edit,field", [
    (lambda m: m.update(tasks={}), "tasks"),
    (lambda m: m["tasks"][0].update(name="../x"), "tasks[0].name"),
    (lambda m: m["tasks"][1].update(name="a"), "tasks[1].name"),
    (lambda m: m["tasks"][0].update(num_classes=10**9), "tasks[0].num_classes"),
    (lambda m: m["base"].update(path="../base"), "base.path"),
    (lambda m: m["base"].update(sha256=None), "base.sha256"),
    (lambda m: m.update(format="other"), "format"),
])
def test_manifest_is_validated_naming_the_field(tmp_path, edit, field):
    _saved(tmp_path)
    _edit_manifest(tmp_path, edit)
    with pytest.raises(ManifestError, match=re.escape(f"'{field}'")):
        GANMemory.load(tmp_path)


@pytest.mark.parametrize("part,key,value", [("generator", "nf", 100_000), ("generator", "size", 12),
                                            ("discriminator", "nlabels", "3"), ("generator", "z_dim", True)])
def test_crafted_base_description_is_refused_before_allocation(tmp_path, part, key, value):
    _saved(tmp_path)
    path = tmp_path / "base" / "base.json"
    config = json.loads(path.read_text())
    config[part][key] = value
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"{part}|size"):
        GANMemory.load(tmp_path)


def test_huge_base_is_refused_by_its_parameter_count(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "base" / "base.json"
    config = json.loads(path.read_text())
    config["generator"].update(size=1024, nf=1024)
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="parameters"):
        GANMemory.load(tmp_path)


def test_other_base_in_target_directory_is_refused(tmp_path):
    _saved(tmp_path)
    other = new_memory(seed=1)
    add_task(other, "z")
    with pytest.raises(ManifestError, match="another base"):
        other.save(tmp_path)


# ------------------------------------------------------------------ damage, repair, GC
def test_damaged_task_blocks_nothing_and_repair_drops_it(tmp_path):
    _saved(tmp_path, ("a", "b", "c"))
    bad = tmp_path / Store(tmp_path).read_manifest()["tasks"][1]["file"]
    bad.write_bytes(b"garbage")
    mem = GANMemory.load(tmp_path)
    add_task(mem, "d", 4)
    mem.save(tmp_path)                                   # b is never read: saving works
    assert [e["name"] for e in Store(tmp_path).read_manifest()["tasks"]] == ["a", "b", "c", "d"]
    report = Store(tmp_path).verify_files()
    assert "damaged" in report["b"] and [k for k, v in report.items() if v] == ["b"]
    assert list(Store(tmp_path).repair()) == ["b"]
    assert GANMemory.load(tmp_path).tasks == ["a", "c", "d"]
    assert all(v is None for v in GANMemory.load(tmp_path).verify().values())
    with pytest.raises(KeyError, match="no task 'b'"):
        Store(tmp_path).remove_tasks(["b"])


def test_gc_spares_young_and_referenced_files(tmp_path):
    _saved(tmp_path, ("a", "b"))
    tasks = tmp_path / "tasks"
    referenced = {p.name for p in tasks.iterdir()}
    old_orphan, young_orphan = tasks / "old-0.safetensors", tasks / "young-0.safetensors"
    stale_tmp = tasks / ".x.safetensors.1-ab.tmp"
    for p in (old_orphan, young_orphan, stale_tmp):
        p.write_bytes(b"x")
    hour_ago = time.time() - 3600
    for p in [old_orphan, stale_tmp] + [tasks / n for n in referenced]:
        os.utime(p, (hour_ago, hour_ago))
    Store(tmp_path).remove_tasks(["a"])     # a's file leaves the manifest now: its grace period starts now
    left = {p.name for p in tasks.iterdir()}
    assert left == referenced | {young_orphan.name}
    a_file = next(n for n in referenced if n.startswith("a-"))
    os.utime(tasks / a_file, (hour_ago, hour_ago))
    Store(tmp_path).collect_garbage()
    assert {p.name for p in tasks.iterdir()} == (referenced - {a_file}) | {young_orphan.name}


# ------------------------------------------------------------------ old memories
def test_memory_written_by_the_previous_release_loads():
    from safetensors.torch import load_file

    expected = load_file(str(FIXTURE / "expected_samples.safetensors"))
    mem = GANMemory.load(FIXTURE / "memory")
    assert mem.tasks == ["a", "b c"]
    for task in mem.tasks:  # equal up to float rounding (the thread count may differ from the writer's)
        torch.testing.assert_close(mem.sample(task, 2, seed=0), expected[task], atol=1e-5, rtol=1e-4)
    assert mem.loaded_tasks == ["a", "b c"]
    assert all(v is None for v in Store(FIXTURE / "memory").verify_files().values())


def test_old_memory_gets_new_tasks_without_rewriting_old_files(tmp_path):
    shutil.copytree(FIXTURE / "memory", tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m" / "tasks").iterdir()}
    mem = GANMemory.load(tmp_path / "m")
    mem.learn("new", torch.zeros(2, 3, 32, 32), iterations=0, progress=False)
    mem.save(tmp_path / "m")
    after = {p.name: p.read_bytes() for p in (tmp_path / "m" / "tasks").iterdir()}
    assert {k: after[k] for k in before} == before and len(after) == 3
    assert GANMemory.load(tmp_path / "m").tasks == ["a", "b c", "new"]
