"""The edges a first user hits (issue 24): links out of a memory, repair of a lost manifest, hints that
work, training never thrown away, one-line errors, input bounds."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gmem import GANMemory
from gmem.cli import main
from gmem.models import Discriminator, Generator, save_base
from gmem.store import ManifestError, Store


def tiny_base(seed=0):
    torch.manual_seed(seed)
    return Generator(32, 4, z_dim=8, embed_size=4), Discriminator(32, 4)


def saved_memory(directory, names=("a", "b"), custom_base=False):
    state = torch.get_rng_state()
    try:
        mem = GANMemory.from_base(*tiny_base())
    finally:
        torch.set_rng_state(state)
    for n in names:
        mem.learn(n, torch.zeros(4, 3, 32, 32), iterations=0, batch_size=2, seed=0, progress=False)
    mem.save(directory)
    return mem


def snapshot(folder: Path) -> dict:
    """Every file below ``folder`` with its bytes (what must not change)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def outside(tmp_path):
    d = tmp_path / "OUTSIDE"
    d.mkdir()
    (d / "v").write_text("precious")
    return d


# ------------------------------------------------------------------ 1. links
def test_lock_link_is_refused_and_outside_unchanged(tmp_path, outside):
    m = tmp_path / "m"
    mem = saved_memory(m)
    before = snapshot(outside)
    (m / ".lock").unlink()
    (m / ".lock").symlink_to(outside / "v")
    mem.learn("c", torch.zeros(4, 3, 32, 32), iterations=0, batch_size=2, seed=0, progress=False)
    with pytest.raises(ManifestError, match="symbolic link"):
        mem.save(m)
    assert snapshot(outside) == before


def test_manifest_link_is_not_read(tmp_path, outside):
    m = tmp_path / "m"
    saved_memory(m)
    shutil.move(m / "manifest.json", outside / "manifest.json")
    (m / "manifest.json").symlink_to(outside / "manifest.json")
    before = snapshot(outside)
    with pytest.raises(ManifestError, match="symbolic link"):
        GANMemory.load(m)
    with pytest.raises(ManifestError, match="symbolic link"):
        saved_memory(m, names=("z",))
    assert snapshot(outside) == before


@pytest.mark.parametrize("what", ["runs", "run", "samples", "log", "claim"])
def test_run_folder_links_are_refused(tmp_path, outside, what):
    m = tmp_path / "m"
    saved_memory(m)
    from gmem.store.files import run_dir_name

    run = m / "runs" / run_dir_name("b2")
    if what == "runs":
        (m / "runs").symlink_to(outside)
    elif what == "run":
        (m / "runs").mkdir()
        run.symlink_to(outside)
    else:
        run.mkdir(parents=True)
        target = {"samples": outside, "log": outside / "v", "claim": outside / "v"}[what]
        (run / {"samples": "samples", "log": "log.jsonl", "claim": ".lock"}[what]).symlink_to(target)
    before = snapshot(outside)
    with pytest.raises(ManifestError, match="symbolic link"):
        with Store(m).claim("b2"):
            pass
    assert snapshot(outside) == before


def test_learn_cli_with_linked_runs_writes_nothing_outside(tmp_path, outside, capsys):
    m = tmp_path / "m"
    saved_memory(m)
    (m / "runs").symlink_to(outside)
    before = snapshot(outside)
    rc = main(["learn", str(m), "b2", "emoji", "--iterations", "1", "--batch-size", "2", "--no-progress",
               "--no-score"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "symbolic link" in err and "runs" in err
    assert snapshot(outside) == before


def test_task_file_and_knowledge_links_are_not_read(tmp_path, outside):
    m = tmp_path / "m"
    saved_memory(m)
    task = next((m / "tasks").glob("a-*.safetensors"))
    shutil.move(task, outside / task.name)
    task.symlink_to(outside / task.name)
    problems = GANMemory.load(m).verify()
    assert "symbolic link" in problems["a"] and problems["b"] is None
    store = Store(m)
    rel, digest = store.write_knowledge(b'{"format":"gmem-knowledge-v1","matrices":{}}\n')
    shutil.move(m / rel, outside / "k.json")
    (m / rel).symlink_to(outside / "k.json")
    with pytest.raises(Exception, match="symbolic link"):
        store.read_knowledge({"file": rel, "sha256": digest})


def test_base_file_link_is_not_read(tmp_path, outside):
    base = tmp_path / "base_src"
    save_base(*tiny_base(), base, dtype=torch.float32)
    m = tmp_path / "m"
    rc = main(["learn", str(m), "a", "emoji", "--base", str(base), "--iterations", "0", "--batch-size", "2",
               "--no-progress", "--no-score"])
    assert rc == 0
    shutil.move(m / "base" / "base.safetensors", outside / "base.safetensors")
    (m / "base" / "base.safetensors").symlink_to(outside / "base.safetensors")
    with pytest.raises(ManifestError, match="symbolic link"):
        GANMemory.load(m)


# ------------------------------------------------------------------ 2. a lost or damaged manifest is rebuilt
@pytest.fixture(scope="module")
def cli_memory(tmp_path_factory):
    """A memory on a tiny custom base with a plain task ``a`` and a conditional task ``c``."""
    import numpy as np

    root = tmp_path_factory.mktemp("edges")
    save_base(*tiny_base(), root / "base", dtype=torch.float32)
    g = np.random.default_rng(0)
    np.save(root / "a.npy", g.integers(0, 255, size=(6, 32, 32, 3), dtype=np.uint8))
    np.savez(root / "c.npz", images=g.integers(0, 255, size=(6, 32, 32), dtype=np.uint8), labels=np.arange(6) % 3)
    m = root / "memory"
    common = ["--iterations", "1", "--batch-size", "2", "--no-progress", "--no-score", "--threads", "1"]
    assert main(["learn", str(m), "a", str(root / "a.npy"), "--base", str(root / "base"), *common]) == 0
    assert main(["learn", str(m), "c", str(root / "c.npz"), "--conditional", *common]) == 0
    return m


def _copy(memory, dest):
    shutil.copytree(memory, dest, ignore=shutil.ignore_patterns("runs", ".lock"))
    return dest


@pytest.mark.parametrize("damage", ["lost", "garbage", "bad field"])
def test_verify_repair_rebuilds_the_manifest(cli_memory, tmp_path, capsys, damage):
    m = _copy(cli_memory, tmp_path / "m")
    before = GANMemory.load(m)
    want = {t: before.sample(t, 3, seed=1) for t in before.tasks}
    manifest = m / "manifest.json"
    if damage == "lost":
        manifest.unlink()
    elif damage == "garbage":
        manifest.write_bytes(b"\x00garbage")
    else:
        manifest.write_text(manifest.read_text().replace('"tasks": [', '"tasks": 7, "x": ['))
    files = snapshot(m / "tasks")
    capsys.readouterr()
    assert main(["verify", str(m)]) == 1
    err = capsys.readouterr().err
    assert f"gmem verify {m} --repair" in err and "gmem learn" not in err
    # learning into it refuses and points to the repair; nothing is deleted
    assert main(["learn", str(m), "z", "emoji", "--iterations", "0", "--no-progress", "--no-score"]) == 1
    err = capsys.readouterr().err
    assert "--repair" in err and err.count("\n") == 1
    assert snapshot(m / "tasks") == files
    assert main(["verify", str(m), "--repair"]) == 0
    out = capsys.readouterr().out
    assert "rebuilt manifest.json" in out and "all readable" in out
    after = GANMemory.load(m)
    assert after.tasks == ["a", "c"] and after.num_classes("c") == 3 and after.num_classes("a") is None
    for t, x in want.items():
        assert torch.equal(after.sample(t, 3, seed=1), x)
    assert main(["learn", str(m), "z", "emoji", "--iterations", "0", "--batch-size", "2", "--no-progress",
                 "--no-score"]) == 0


def test_rebuild_infers_classes_of_files_without_entry_metadata(cli_memory, tmp_path):
    """Task files written before they carried their entry: num_classes comes from the head's shape."""
    from gmem.store import task_bytes

    m = _copy(cli_memory, tmp_path / "m")
    mem = GANMemory.load(m)
    new = tmp_path / "n"
    for name in mem.tasks:
        data = task_bytes(mem.task_tensors(name), name)  # no entry metadata, as before issue 24
        Store(new).prepare().write_task(name, data)
    shutil.copytree(m / "base", new / "base")
    GANMemory.rebuild_manifest(new)
    again = GANMemory.load(new)
    assert again.num_classes("c") == 3 and again.num_classes("a") is None
    assert torch.equal(again.sample("c", 2, seed=0), mem.sample("c", 2, seed=0))


# ------------------------------------------------------------------ 3. hints that work, --restart
def test_resume_with_other_data_hint_restart_works(cli_memory, tmp_path, capsys):
    m = _copy(cli_memory, tmp_path / "m")
    data = cli_memory.parent
    common = ["--batch-size", "2", "--no-progress", "--no-score", "--threads", "1"]
    assert main(["learn", str(m), "r", str(data / "a.npy"), "--iterations", "1", *common]) == 0
    assert main(["remove", str(m), "r"]) == 0  # its young run folder (checkpoint) stays
    capsys.readouterr()
    argv = ["learn", str(m), "r", str(data / "c.npz"), "--iterations", "1", *common]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--restart" in err
    assert main(argv + ["--restart"]) == 0  # the hint, run
    assert "r" in GANMemory.load(m).tasks


# ------------------------------------------------------------------ 4. training is never thrown away
def test_one_image_is_learned_and_saved_with_scoring_skipped(cli_memory, tmp_path, capsys):
    m = _copy(cli_memory, tmp_path / "m")
    one = tmp_path / "one.npy"
    np.save(one, np.zeros((1, 32, 32, 3), np.uint8))
    assert main(["learn", str(m), "solo", str(one), "--iterations", "1", "--batch-size", "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "not scored" in captured.err and "at least 2 images" in captured.err
    assert "solo" in GANMemory.load(m).tasks


def test_a_scoring_failure_is_a_warning_after_the_task_is_saved(cli_memory, tmp_path, capsys, monkeypatch):
    import gmem.eval

    def broken(*_):
        raise RuntimeError("scoring exploded")

    monkeypatch.setattr(gmem.eval, "pixel_fid", broken)
    m = _copy(cli_memory, tmp_path / "m")
    assert main(["learn", str(m), "s", str(cli_memory.parent / "a.npy"), "--iterations", "1", "--batch-size", "2",
                 "--no-progress"]) == 0
    assert "could not be scored" in capsys.readouterr().err and "s" in GANMemory.load(m).tasks


# ------------------------------------------------------------------ 7. SIGTERM checkpoints like Ctrl-C
def test_sigterm_stops_with_a_checkpoint_that_resumes(cli_memory, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    m = _copy(cli_memory, tmp_path / "m")
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    argv = [sys.executable, "-m", "gmem.cli", "learn", str(m), "t", str(cli_memory.parent / "a.npy"),
            "--batch-size", "2", "--no-progress", "--no-score", "--checkpoint-every", "100000"]
    proc = subprocess.Popen(argv + ["--iterations", "100000"], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    from gmem.store.files import run_dir_name

    run = m / "runs" / run_dir_name("t")
    deadline = time.time() + 120
    while not (run / "log.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "resume" in err
    assert (run / "checkpoint.pt").is_file()
    done = subprocess.run(argv + ["--iterations", "1"], env=env, text=True, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "(1 iterations" not in done.stdout  # resumed past iteration 1, not restarted


# ------------------------------------------------------------------ 5. one-line errors
def test_full_disk_while_writing_a_checkpoint_is_one_line(cli_memory, tmp_path, capsys, monkeypatch):
    import gmem.atomic

    def full(*_a, **_k):  # what torch's writer raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(gmem.atomic, "_free_bytes", lambda folder: 0)
    m = _copy(cli_memory, tmp_path / "m")
    manifest = (m / "manifest.json").read_bytes()
    rc = main(["learn", str(m), "f", str(cli_memory.parent / "a.npy"), "--iterations", "1", "--batch-size", "2",
               "--no-progress", "--no-score"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "disk is full" in err and "checkpoint.pt" in err
    assert (m / "manifest.json").read_bytes() == manifest


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_full_disk_inside_torchs_writer_is_enospc(monkeypatch, tmp_path):
    """torch's zip writer turns the failed write into "[enforce fail at inline_container.cc] unexpected
    pos ..." (no errno): the checkpoint writer must still say the disk is full."""
    import errno

    import gmem.atomic

    def to_dev_full(path, write):  # every write fails with ENOSPC, as on a full disk
        with open("/dev/full", "wb", buffering=0) as f:
            write(f)

    monkeypatch.setattr(gmem.atomic, "atomic_write", to_dev_full)
    with pytest.raises(OSError) as e:
        gmem.atomic.atomic_torch_save({"w": torch.zeros(100_000)}, tmp_path / "checkpoint.pt")
    assert e.value.errno == errno.ENOSPC and "checkpoint.pt" in str(e.value)


def test_npz_that_is_not_a_zip_is_one_line(tmp_path, capsys):
    (tmp_path / "c.npz").write_bytes(b"PK\x03\x04 this is not a zip at all" * 10)
    rc = main(["learn", str(tmp_path / "m"), "x", str(tmp_path / "c.npz"), "--iterations", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "c.npz" in err and "cannot read" in err
    assert not (tmp_path / "m").exists()  # a failed first learn leaves no empty memory directory behind


@pytest.mark.parametrize("option", ["--nf", "--z-dim", "--embed-size"])
def test_train_base_zero_width_is_one_line(tmp_path, capsys, option):
    rc = main(["train-base", "--out", str(tmp_path / "o"), option, "0", "--iterations", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and option in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 6. input bounds before allocation
@pytest.mark.parametrize("argv,message", [
    (["--scale", "1000"], "--scale"), (["--scale", "0"], "--scale"), (["--scale", "-2"], "--scale"),
    (["-n", "0"], "-n"), (["-n", "100000000"], "-n"), (["--seed", str(2**70)], "--seed"),
    (["--seed", "-1"], "--seed"), (["-n", "5000", "--scale", "32"], "megapixels"),
])
def test_sample_bounds_are_one_line(cli_memory, tmp_path, capsys, argv, message):
    rc = main(["sample", str(cli_memory), "a", "--out", str(tmp_path / "s.png"), *argv])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "s.png").exists()


def test_interpolate_and_learn_seed_bounds(cli_memory, tmp_path, capsys):
    assert main(["interpolate", str(cli_memory), "a", "c", "--scale", "0", "--out", str(tmp_path / "i.png")]) == 1
    assert main(["learn", str(tmp_path / "m"), "x", "emoji", "--seed", str(2**70), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "--scale" in err and "--seed" in err and not (tmp_path / "m").exists()


def test_huge_num_classes_in_a_manifest_is_refused_before_allocation(cli_memory, tmp_path):
    import resource

    m = _copy(cli_memory, tmp_path / "m")
    manifest = json.loads((m / "manifest.json").read_text())
    manifest["tasks"][1]["num_classes"] = 100_000
    (m / "manifest.json").write_text(json.dumps(manifest))
    mem = GANMemory.load(m)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(Exception, match="num_classes"):
        mem.sample("c", 1, seed=0)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no GBs allocated
    assert mem.sample("a", 1, seed=0).shape == (1, 3, 32, 32)


def test_big_photos_are_decoded_at_reduced_size(tmp_path):
    """A folder of large JPEG photos costs memory in proportion to the training size."""
    import resource

    from PIL import Image

    from gmem.data import as_dataset

    g = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(g.integers(0, 255, (3000, 4000, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.jpg", quality=80)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ds = as_dataset(tmp_path, 32, 3)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert len(ds) == 3 and grown < 60_000, grown  # KiB; a full-size float decode is ~140 MB per photo


def test_every_unreadable_image_is_named(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    for i in range(6):
        (tmp_path / f"bad{i}.png").write_bytes(b"not an image")
    rc = main(["learn", str(tmp_path / "m"), "x", str(tmp_path), "--iterations", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "6 of 7 images" in err
    assert all(f"bad{i}.png" in err for i in range(6))


def test_transparency_warning_is_one_line(tmp_path, capsys):
    from PIL import Image

    for i in range(2):
        Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / f"t{i}.png")
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "gmem.cli", "learn", str(tmp_path / "m"), "x", str(tmp_path),
                           "--iterations", "0", "--batch-size", "2", "--no-progress", "--no-score"], env=env,
                          text=True, capture_output=True, timeout=300)
    err = done.stderr
    assert done.returncode == 0 and "gmem learn: warning:" in err and "transparency" in err, err
    assert "warnings.warn" not in err and "data.py" not in err and err.count("\n") == 1


# ------------------------------------------------------------------ 8. the smaller ones
@pytest.mark.parametrize("damage", ["task", "knowledge"])
def test_info_lists_a_damaged_compressed_task(cli_memory, tmp_path, capsys, damage):
    m = _copy(cli_memory, tmp_path / "m")
    assert main(["learn", str(m), "k", str(cli_memory.parent / "a.npy"), "--compress", "--iterations", "1",
                 "--batch-size", "2", "--no-progress", "--no-score"]) == 0
    victim = next((m / "tasks").glob("k-*")) if damage == "task" else next((m / "knowledge").glob("*.json"))
    victim.write_bytes(b"garbage")
    capsys.readouterr()
    assert main(["info", str(m)]) == 0
    out = capsys.readouterr().out
    assert " a " in out and "DAMAGED" in out and victim.name in out
    assert main(["info", str(m), "--verify"]) == 1
    capsys.readouterr()
    assert main(["info", str(m), "--json"]) == 0
    assert "k" in json.loads(capsys.readouterr().out)["damaged"]


def test_remove_on_a_missing_memory_says_so(tmp_path, capsys):
    assert main(["remove", str(tmp_path / "nothing"), "a"]) == 1
    err = capsys.readouterr().err
    assert "no GAN memory" in err and ".lock" not in err and not (tmp_path / "nothing").exists()
    (tmp_path / "plain").mkdir()
    assert main(["remove", str(tmp_path / "plain"), "a"]) == 1
    assert not (tmp_path / "plain" / ".lock").exists()


def test_conditional_refuses_images_beside_the_class_folders(tmp_path, capsys):
    from PIL import Image

    for folder in ("cats", "dogs", ""):
        (tmp_path / "d" / folder).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / "d" / folder / f"{folder or 'top'}{i}.png")
    rc = main(["learn", str(tmp_path / "m"), "x", str(tmp_path / "d"), "--conditional", "--iterations", "0",
               "--no-progress", "--no-score"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "top0.png" in err and "class sub-folder" in err


def test_bad_hash_message_shows_prefixes_that_differ(tmp_path):
    from gmem.store import TaskFileError

    m = tmp_path / "m"
    saved_memory(m)
    manifest = json.loads((m / "manifest.json").read_text())
    real = manifest["tasks"][0]["sha256"]
    manifest["tasks"][0]["sha256"] = real[:20] + ("0" if real[20] != "0" else "1") + real[21:]
    (m / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TaskFileError) as e:
        GANMemory.load(m).sample("a", 1, seed=0)
    import re

    shown = re.findall(r"sha256 ([0-9a-f]+)\.\.\. does not match ([0-9a-f]+)\.\.\.", str(e.value))[0]
    assert shown[0] != shown[1]


# ------------------------------------------------------------------ every hint a message prints works
def _hints(text: str) -> list[list[str]]:
    import re
    import shlex

    return [shlex.split(h)[1:] for h in re.findall(r"`(gmem [^`]+)`", text)]


def test_every_hint_of_a_damaged_memory_works_and_keeps_the_rest(cli_memory, tmp_path, capsys):
    m = _copy(cli_memory, tmp_path / "m")
    next((m / "tasks").glob("c-*.safetensors")).write_bytes(b"garbage")
    capsys.readouterr()
    learn = ["learn", str(m), "z", str(cli_memory.parent / "a.npy"), "--iterations", "0", "--batch-size", "2",
             "--no-progress", "--no-score"]
    messages = []
    assert main(["verify", str(m)]) == 1
    messages.append(capsys.readouterr().out)
    assert main(learn) == 1
    messages.append(capsys.readouterr().err)
    hints = [h for text in messages for h in _hints(text)]
    assert len(hints) >= 3, messages
    for i, hint in enumerate(hints):
        copy = _copy(m, tmp_path / f"h{i}")
        hint = [str(copy) if a == str(m) else a for a in hint]
        assert main(hint) == 0, hint
        assert main([str(copy) if a == str(m) else a for a in learn]) == 0  # and then learning works
        assert torch.equal(GANMemory.load(copy).sample("a", 2, seed=0), GANMemory.load(m).sample("a", 2, seed=0))


# ------------------------------------------------------------------ thread defaults
def test_cli_defaults_to_one_thread_unless_told(cli_memory, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["info", str(cli_memory)]) == 0 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert main(["info", str(cli_memory)]) == 0 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


def test_learn_names_its_threads_and_wait_policy(cli_memory, tmp_path, capsys, monkeypatch):
    """Timings a user reads are only comparable with the thread setting next to them."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    old = torch.get_num_threads()
    try:
        assert main(["learn", str(_copy(cli_memory, tmp_path / "m")), "p", str(cli_memory.parent / "a.npy"),
                     "--iterations", "1", "--batch-size", "2", "--no-score", "--no-progress", "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(old)
    assert "2 torch threads, OMP_WAIT_POLICY=PASSIVE)" in capsys.readouterr().out


def test_saving_over_old_orphaned_task_files_is_refused(tmp_path):
    """GANMemory.save into a directory whose manifest was lost: refused, the task files stay."""
    m = tmp_path / "m"
    saved_memory(m)
    (m / "manifest.json").unlink()
    for p in (m / "tasks").iterdir():
        os.utime(p, (1_000_000, 1_000_000))  # older than the garbage collector's grace period
    files = snapshot(m / "tasks")
    with pytest.raises(ManifestError, match="--repair"):
        saved_memory(m, names=("z",))
    assert all(k in snapshot(m / "tasks") for k in files)
    GANMemory.rebuild_manifest(m)
    assert {"a", "b"} <= set(GANMemory.load(m).tasks)  # (z's file was written before the refusal)
