"""The GAN-memory CLI commands: --help, a tiny end-to-end session, clear errors and exit codes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gmem.cli import COMMANDS, main
from gmem.models import Discriminator, Generator, save_base

# options each command's --help must list (a help text without them is wrong, whatever else it says)
HELP_OPTIONS = {
    "learn": ("--iterations", "--batch-size", "--base", "--no-progress", "--no-score"),
    "sample": ("--seed", "--labels", "--out", "--tensor"),
    "interpolate": ("--steps", "--lam", "--groups", "--layers"),
    "info": ("--json", "--layers", "--verify"),
    "demo": ("--out", "--iterations", "--tasks", "--base"),
    "doctor": ("--json", "--no-timing", "--backend", "--save"),
}


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("base")
    save_base(Generator(32, 4, z_dim=8, embed_size=4), Discriminator(32, 4), d, dtype=torch.float32)
    return d


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    g = np.random.default_rng(0)
    np.save(d / "a.npy", g.integers(0, 255, size=(10, 28, 28, 3), dtype=np.uint8))
    np.savez(d / "c.npz", images=g.integers(0, 255, size=(12, 32, 32), dtype=np.uint8),
             labels=np.arange(12) % 3)
    return d


@pytest.fixture(scope="module")
def memory(tiny_base_dir, data_files, tmp_path_factory):
    m = tmp_path_factory.mktemp("mem") / "memory"
    common = ["--iterations", "2", "--batch-size", "4", "--no-progress", "--threads", "1"]
    assert main(["learn", str(m), "a", str(data_files / "a.npy"), "--base", str(tiny_base_dir), *common]) == 0
    assert main(["learn", str(m), "c", str(data_files / "c.npz"), "--conditional", *common]) == 0
    return m


@pytest.mark.parametrize("command", sorted(HELP_OPTIONS))
def test_help(command, capsys):
    assert command in COMMANDS
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: gmem {command}")
    missing = [opt for opt in HELP_OPTIONS[command] if opt not in out.split()]
    assert not missing, (missing, out)


def test_learn_sample_interpolate_info(memory, tmp_path, capsys):
    manifest = json.loads((memory / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["a", "c"] and manifest["tasks"][1]["num_classes"] == 3
    assert "pixfid8" in manifest["tasks"][0]["metrics"]
    assert main(["sample", str(memory), "a", "-n", "3", "--out", str(tmp_path / "s.png"),
                 "--tensor", str(tmp_path / "s.safetensors")]) == 0
    from safetensors.torch import load_file
    assert load_file(str(tmp_path / "s.safetensors"))["images"].shape == (3, 3, 32, 32)
    assert main(["sample", str(memory), "source", "a", "c", "-n", "2", "--labels", "2",
                 "--out", str(tmp_path / "rows.png")]) == 0
    assert (tmp_path / "rows.png").is_file()
    assert main(["interpolate", str(memory), "source", "a", "--steps", "3", "-n", "2", "--groups", "scale,shift",
                 "--layers", "resnet_0_0.*", "--out", str(tmp_path / "i.png")]) == 0
    assert (tmp_path / "i.png").is_file()
    capsys.readouterr()
    assert main(["info", str(memory)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    assert [row[1] for row in rows if row[:1] in (["1"], ["2"])] == ["a", "c"], out  # the task table: index, name
    assert "% of G" in out and "pixfid8" in out
    assert main(["info", str(memory), "--json", "--layers"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in info["tasks"]] == ["a", "c"] and info["tasks"][1]["classes"] == 3
    assert "fc" in info["layers"]


@pytest.mark.parametrize("argv,message", [
    (["sample", "{mem}", "nope"], "unknown task 'nope'"),
    (["sample", "{mem}", "c", "-n", "2", "--labels", "0,5"], "class 5 out of range"),
    (["sample", "{mem}", "a", "--labels", "1"], "unconditional"),
    (["sample", "{tmp}/missing", "a"], "no GAN memory"),
    (["interpolate", "{mem}", "a", "zzz"], "unknown task 'zzz'"),
    (["interpolate", "{mem}", "source", "a", "--layers", "nothing*"], "match no modulated"),
    (["learn", "{mem}", "new", "{tmp}/no_such_dir"], "data not found"),
    (["learn", "{mem}", "a", "emoji"], "exists already"),
    (["learn", "{tmp}/fresh", "x", "{data}/c.npz", "--base", "{tmp}/not_a_base"], "not found"),
])
def test_clear_errors(argv, message, memory, data_files, tmp_path, capsys):
    argv = [a.format(mem=memory, tmp=tmp_path, data=data_files) for a in argv]
    assert main(argv + ["--no-progress"] if argv[0] == "learn" else argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"gmem {argv[0]}: error:") and message in err


def test_usage_error_exit_code(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample"])
    assert e.value.code == 2


def test_demo_end_to_end_tiny(tiny_base_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--base", str(tiny_base_dir), "--iterations", "2", "--fid-samples", "0",
                 "--tasks", "emoji,fashion_mnist",
                 "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "no forgetting" in text and "bit-identical" in text and "pixFID8" in text and "NN ratio" in text
    assert (out / "tasks_after_2_fashion_mnist.png").is_file() and (out / "interp_1_source_to_emoji.png").is_file()
    assert (out / "classes_2_fashion_mnist.png").is_file() and (out / "memory" / "manifest.json").is_file()


def test_info_verify_names_a_damaged_file(memory, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(memory, copy)
    victim = next((copy / "tasks").glob("c-*.safetensors"))
    victim.write_bytes(b"garbage")
    assert main(["info", str(copy)]) == 0          # reading the manifest needs no task file
    assert main(["info", str(copy), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "a: ok" in out and "DAMAGED" in out and victim.name in out
    assert main(["sample", str(copy), "a", "-n", "2", "--out", str(tmp_path / "ok.png")]) == 0
    assert main(["sample", str(copy), "c", "-n", "2", "--out", str(tmp_path / "bad.png")]) == 1
    assert victim.name in capsys.readouterr().err


def test_demo_detects_forgetting(tiny_base_dir, tmp_path, monkeypatch, capsys):
    """If learning a task disturbed an earlier one, the demo says so and exits with 3."""
    import gmem.nn as gnn
    from gmem.memory import GANMemory

    original = GANMemory.learn

    def leaky_learn(self, name, *args, **kwargs):
        index = original(self, name, *args, **kwargs)
        if len(self.tasks) > 1:
            with torch.no_grad():
                gnn.style_parameters(self.generator, self.tasks[0])[0].add_(0.5)
        return index

    monkeypatch.setattr(GANMemory, "learn", leaky_learn)
    code = main(["demo", "--base", str(tiny_base_dir), "--iterations", "1", "--fid-samples", "0",
                 "--tasks", "emoji,oxygen_icons",
                 "--out", str(tmp_path / "demo"), "--no-progress"])
    assert code == 3
    assert "FORGETTING DETECTED" in capsys.readouterr().out


# ---------------------------------------------------------------- user errors as real processes
REPO = Path(__file__).resolve().parent.parent


def _gmem(*argv, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "gmem.cli", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _assert_one_line_error(proc, command, message):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gmem {command}: error: ") and message in lines[0], err


@pytest.fixture
def damaged_memory(memory, tmp_path):
    copy = tmp_path / "damaged"
    shutil.copytree(memory, copy, ignore=shutil.ignore_patterns("runs"))
    next((copy / "tasks").glob("c-*.safetensors")).write_bytes(b"garbage")
    return copy


def test_user_errors_are_one_line_in_a_real_process(memory, damaged_memory, data_files, tmp_path):
    import torch
    from test_data import _png_header_only

    (tmp_path / "afile").write_text("not a memory")
    (tmp_path / "bombs").mkdir()
    _png_header_only(tmp_path / "bombs" / "bomb.png", 9000, 9000)
    (tmp_path / "outdir").mkdir()
    common = ["--iterations", "1", "--no-progress", "--no-score"]
    cases = [
        (["learn", "afile", "x", str(data_files / "a.npy"), *common], "is a file"),
        (["sample", "afile", "a"], "is a file"),
        (["learn", str(memory), "../x", str(data_files / "a.npy"), *common], "path separator"),
        (["learn", str(memory), ".x", str(data_files / "a.npy"), *common], "starts with a dot"),
        (["learn", str(memory), "new", str(data_files / "a.npy"), "--batch-size", "100000000", *common],
         "--batch-size"),
        (["learn", str(memory), "new", str(data_files / "a.npy"), "--batch-size", "2000000", *common], "--batch-size"),
        (["learn", str(memory), "new", str(data_files / "a.npy"), "--r1-gamma", "-1", *common], "--r1-gamma"),
        (["learn", str(memory), "new", str(data_files / "a.npy"), "--ema", "1.5", *common], "--ema"),
        (["learn", str(damaged_memory), "new", str(data_files / "a.npy"), *common], "gmem remove"),
        (["learn", str(memory), "new", "bombs", *common], "decompression bomb"),
        (["sample", str(memory), "a", "--out", "outdir"], "is a directory"),
        (["sample", str(memory), "a", "--out", "x.xyz"], "unknown image file suffix"),
        (["interpolate", str(memory), "source", "a", "--lam", "nan"], None),
    ]
    if not torch.cuda.is_available():
        cases.append((["learn", str(memory), "new", str(data_files / "a.npy"), "--device", "cuda", *common],
                      "no CUDA GPU"))
    for start in range(0, len(cases), 3):  # a few processes at a time: each one imports torch
        procs = [(argv, message, _gmem(*argv, cwd=tmp_path)) for argv, message in cases[start:start + 3]]
        for argv, message, proc in procs:
            if message is None:  # an argparse usage error: exit 2, no traceback
                out, err = proc.communicate(timeout=600)
                assert proc.returncode == 2 and "finite" in err and "Traceback" not in err
                continue
            _assert_one_line_error(proc, argv[0], message)
    assert not (memory / "runs" / "new").exists() and not list((memory / "runs").glob("new-*"))  # nothing trained
    assert not (tmp_path / "afile").is_dir() and (tmp_path / "afile").read_text() == "not a memory"


def test_sample_out_suffix_names_the_format(memory, tmp_path):
    from PIL import Image

    for suffix, fmt in ((".jpg", "JPEG"), (".png", "PNG"), (".webp", "WEBP")):
        out = tmp_path / f"s{suffix}"
        assert main(["sample", str(memory), "a", "-n", "2", "--out", str(out)]) == 0
        with Image.open(out) as im:
            assert im.format == fmt
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_verify_and_remove_commands(damaged_memory, capsys):
    assert main(["verify", str(damaged_memory)]) == 1
    out = capsys.readouterr().out
    assert "a: ok" in out and "c: DAMAGED" in out and "--repair" in out
    assert main(["verify", str(damaged_memory), "--repair"]) == 0
    assert "removed 1 damaged task" in capsys.readouterr().out
    assert main(["verify", str(damaged_memory)]) == 0
    assert main(["remove", str(damaged_memory), "a"]) == 0
    capsys.readouterr()
    assert main(["info", str(damaged_memory), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == []
    assert main(["remove", str(damaged_memory), "a"]) == 1
    assert "no task 'a'" in capsys.readouterr().err


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs mounted at tmp_path/fs (needs root and mount rights; skipped otherwise)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _copy_memory(memory, dest):
    shutil.copytree(memory, dest, ignore=shutil.ignore_patterns("runs", ".lock"))
    return json.loads((dest / "manifest.json").read_text())


def test_read_only_memory_is_refused_before_training(memory, data_files, small_tmpfs):
    manifest = _copy_memory(memory, small_tmpfs / "m")
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    proc = _gmem("learn", str(small_tmpfs / "m"), "new", str(data_files / "a.npy"), "--iterations", "1",
                 "--no-progress", cwd=data_files)
    _assert_one_line_error(proc, "learn", "Read-only file system")
    assert json.loads((small_tmpfs / "m" / "manifest.json").read_text()) == manifest


def test_full_disk_is_one_line_and_leaves_the_memory_intact(memory, data_files, small_tmpfs):
    manifest = _copy_memory(memory, small_tmpfs / "m")
    fd = os.open(small_tmpfs / "filler", os.O_WRONLY | os.O_CREAT)  # fill the file system up
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    proc = _gmem("learn", str(small_tmpfs / "m"), "new", str(data_files / "a.npy"), "--iterations", "1",
                 "--batch-size", "4", "--no-progress", "--no-score", cwd=data_files)
    _assert_one_line_error(proc, "learn", "disk is full")
    assert json.loads((small_tmpfs / "m" / "manifest.json").read_text()) == manifest
    os.unlink(small_tmpfs / "filler")
    assert main(["verify", str(small_tmpfs / "m")]) == 0
