"""gmem.store.gc: garbage collection of run folders and stale temporary files (files aged with os.utime)."""
import os
import time
from pathlib import Path

import torch

from gmem import GANMemory
from gmem.models import Discriminator, Generator
from gmem.seeding import seeded
from gmem.store import Store
from gmem.store import files as store_files
from gmem.store import gc as store_gc
from gmem.store.gc import GC_GRACE_SECONDS, collect_garbage

HOUR_AGO = time.time() - 3600


def age(*paths: Path) -> None:
    """Make ``paths`` (and, for a folder, everything in it) an hour old; folders last (writing a file
    into a folder changes the folder's time)."""
    for path in paths:
        tree = [Path(root) / n for root, dirs, files in os.walk(path, topdown=False) for n in files + dirs]
        for p in tree + [path]:
            os.utime(p, (HOUR_AGO, HOUR_AGO), follow_symlinks=False)


def run_folder(directory: Path, name: str, *files: str) -> Path:
    run = directory / "runs" / store_files.run_dir_name(name)
    for rel in files:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(b"x")
    return run


def manifest(*names: str) -> dict:
    return {"tasks": [{"name": n, "file": f"tasks/{n}-0.safetensors"} for n in names]}


def test_grace_is_ten_minutes_as_the_help_says():
    from gmem.cli.verify import GC_HELP

    assert GC_GRACE_SECONDS == 600.0 and store_gc.GC_GRACE_SECONDS == GC_GRACE_SECONDS and "10 minutes" in GC_HELP


def test_stale_checkpoint_tmp_goes_the_run_folder_of_a_kept_task_stays(tmp_path):
    run = run_folder(tmp_path, "a", "checkpoint.pt", "samples/it_0000010.png", ".checkpoint.pt.123-ab12cd34.tmp",
                     "samples/.it_0000020.png.123-00ff00ff.tmp")
    age(run)
    young = run / ".checkpoint.pt.456-0a0b0c0d.tmp"
    young.write_bytes(b"being written")
    deleted = collect_garbage(tmp_path, manifest=manifest("a"))
    assert sorted(deleted) == sorted([run / ".checkpoint.pt.123-ab12cd34.tmp",
                                      run / "samples" / ".it_0000020.png.123-00ff00ff.tmp"])
    assert {p.name for p in run.rglob("*")} == {"checkpoint.pt", "samples", "it_0000010.png", young.name}


def test_run_folder_of_a_task_not_in_the_manifest_goes_when_old_and_unclaimed(tmp_path):
    gone = run_folder(tmp_path, "removed", "samples/it_0000010.png", ".lock")
    kept = run_folder(tmp_path, "kept", "checkpoint.pt")
    age(gone, kept)
    assert collect_garbage(tmp_path, manifest=manifest("kept")) == [gone]
    assert not gone.exists() and (kept / "checkpoint.pt").is_file()


def test_a_resumable_checkpoint_is_kept_unless_its_task_is_removed(tmp_path):
    """A killed learner's checkpoint (its task never saved) stays, however old: `gmem learn` resumes it."""
    killed = run_folder(tmp_path, "killed", "checkpoint.pt", "samples/it_0000010.png", ".lock")
    removed = run_folder(tmp_path, "removed", "checkpoint.pt", ".lock")
    age(killed, removed)
    assert collect_garbage(tmp_path, manifest=manifest(), removed=["removed"]) == [removed]
    assert (killed / "checkpoint.pt").is_file()


def test_run_folder_being_learned_is_kept_young_or_claimed(tmp_path):
    # the Python API's learner (no claim): its checkpoint is newer than the grace period
    fresh = run_folder(tmp_path, "fresh", "samples/it_0000010.png", ".checkpoint.pt.1-00000000.tmp")
    age(fresh)
    (fresh / "checkpoint.pt").write_bytes(b"just written")
    # gmem learn: it holds its claim, however long ago it last wrote anything
    with Store(tmp_path).claim("slow") as slow:
        (slow / "checkpoint.pt").write_bytes(b"x")
        age(slow)
        deleted = collect_garbage(tmp_path, manifest=manifest())
        assert (slow / "checkpoint.pt").is_file() and (fresh / "checkpoint.pt").is_file()
        assert deleted == [fresh / ".checkpoint.pt.1-00000000.tmp"]  # a stale temporary file goes even so
    age(slow)
    # the learner died (claim released): its checkpoint stays for `gmem learn` to resume (issue 24)
    assert collect_garbage(tmp_path, manifest=manifest()) == [] and (slow / "checkpoint.pt").is_file()
    (slow / "checkpoint.pt").unlink()
    age(slow)
    assert collect_garbage(tmp_path, manifest=manifest()) == [slow]  # nothing to resume: it goes
    assert fresh.is_dir()


def test_only_run_folders_are_considered_and_links_are_not_followed(tmp_path):
    outside = tmp_path / "outside"
    (outside / "x").mkdir(parents=True)
    (outside / "x" / "keep.txt").write_bytes(b"x")
    (outside / ".old.tmp").write_bytes(b"x")
    runs = tmp_path / "m" / "runs"
    (runs / "notes").mkdir(parents=True)
    (runs / "notes" / "mine.txt").write_bytes(b"x")
    (runs / "lnk-0123abcd").symlink_to(outside / "x")
    run = run_folder(tmp_path / "m", "a", "checkpoint.pt")
    (run / ".tmp-link.tmp").symlink_to(outside / ".old.tmp")
    age(outside, runs)
    assert collect_garbage(tmp_path / "m", manifest=manifest("a")) == []
    assert (runs / "notes" / "mine.txt").is_file() and (outside / "x" / "keep.txt").is_file()
    assert (outside / ".old.tmp").is_file() and (run / ".tmp-link.tmp").is_symlink()


def test_claim_after_its_folder_was_collected_works(tmp_path):
    run = run_folder(tmp_path, "a", "samples/it_0000010.png", ".lock")
    age(run)
    assert collect_garbage(tmp_path, manifest=manifest()) == [run]
    with Store(tmp_path).claim("a") as again:
        assert again == run and (run / ".lock").read_text() == str(os.getpid())


def test_removing_a_task_collects_its_old_run_folder(tmp_path):
    with seeded(0):
        mem = GANMemory.from_base(Generator(32, 4, z_dim=8, embed_size=4), Discriminator(32, 4))
    for name in ("a", "b"):
        with Store(tmp_path).claim(name) as run:
            mem.learn(name, torch.zeros(4, 3, 32, 32), iterations=0, batch_size=2, seed=0, progress=False)
            (run / "checkpoint.pt").write_bytes(b"x")
    mem.save(tmp_path)
    runs = {n: tmp_path / "runs" / store_files.run_dir_name(n) for n in ("a", "b")}
    age(*runs.values())
    Store(tmp_path).remove_tasks(["a"])
    assert not runs["a"].exists() and (runs["b"] / "checkpoint.pt").is_file()
