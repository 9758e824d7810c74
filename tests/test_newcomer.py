"""What a newcomer reads first: labelled sample grids, what ``learn`` trained on, ETAs in logs, scores.

- grids whose rows are tasks name them (``gmem sample`` with several tasks, the demo's figures);
- ``gmem learn`` says how many images it uses, which files of the folder it skipped, and where its
  sample grids and checkpoints go;
- progress written to a log (no terminal) gives the time so far and an estimate of the time left;
- ``gmem info`` shows the base's score next to each task's.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from gmem.cli import main as cli_main
from gmem.images import save_grid
from gmem.training.progress import Progress


def _open(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def test_grid_rows_labelled(tmp_path):
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    save_grid(images, tmp_path / "plain.png", nrow=3, scale=2)
    save_grid(images, tmp_path / "labelled.png", nrow=3, scale=2, row_labels=["source", "emoji"])
    plain, labelled = _open(tmp_path / "plain.png"), _open(tmp_path / "labelled.png")
    margin = labelled.shape[1] - plain.shape[1]
    assert margin > 20 and labelled.shape[0] == plain.shape[0]
    assert np.array_equal(labelled[:, margin:], plain), "the grid itself is unchanged"
    rows = plain.shape[0] // 2
    assert labelled[:rows, :margin].max() > 200 and labelled[rows:, :margin].max() > 200, "each row has a label"
    with pytest.raises(ValueError, match="row_labels has 3 texts for 2 grid rows"):
        save_grid(images, tmp_path / "bad.png", nrow=3, row_labels=["a", "b", "c"])


def test_cli_sample_labels_rows_with_task_names(tmp_path, capsys):
    out_one, out_two = tmp_path / "one.png", tmp_path / "two.png"
    memory = tmp_path / "memory"
    assert cli_main(["learn", str(memory), "a", "fashion_mnist", "--iterations", "1", "--batch-size", "2",
                     "--no-score", "--no-progress"]) == 0
    assert cli_main(["sample", str(memory), "a", "-n", "3", "--out", str(out_one), "--scale", "1"]) == 0
    assert cli_main(["sample", str(memory), "source", "a", "-n", "3", "--out", str(out_two), "--scale", "1"]) == 0
    one, two = _open(out_one), _open(out_two)
    assert two.shape[1] > one.shape[1], "several tasks: a margin with the task names"
    assert one.shape[1] == 3 * 34 + 2, "one task: the plain grid"


def test_learn_says_what_it_trains_on_and_info_shows_the_base_score(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    for name in ("notes.txt", "photo.jfif", "README"):
        (folder / name).write_text("not an image")
    memory = tmp_path / "memory"
    assert cli_main(["learn", str(memory), "t", str(folder), "--iterations", "1", "--batch-size", "2",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"4 images from {folder}" in out
    assert "skipped 3 files that are not images: README, notes.txt, photo.jfif" in out
    assert f"sample grids and checkpoints in {memory}/runs/" in out
    assert "pixFID8 base " in out and " -> task " in out
    assert cli_main(["info", str(memory)]) == 0
    info = capsys.readouterr().out
    line = next(ln for ln in info.splitlines() if " t " in ln)
    assert "pixfid8: base " in line and " -> task " in line


def test_log_progress_has_elapsed_and_eta():
    stream = io.StringIO()
    p = Progress(total=8, stream=stream, lines=4)
    for _ in range(8):
        p.update({"g": 1.0})
    p.close()
    lines = stream.getvalue().strip().splitlines()
    assert lines[0] == "train: iteration 0/8"
    assert [ln.split(" (")[0] for ln in lines[1:]] == [f"train: iteration {k}/8" for k in (2, 4, 6, 8)]
    assert all("elapsed" in ln and "ETA" in ln for ln in lines[1:-1])
    assert "elapsed" in lines[-1] and "ETA" not in lines[-1]
