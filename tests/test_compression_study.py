"""tools/compression_study.py end to end at a tiny size: the table, the plots, the truncation study and
``--rewrite`` (which must render the same table from results.json)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import compression_study  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_study_writes_consistent_outputs_and_rewrite_reproduces_them(tmp_path, monkeypatch):
    monkeypatch.setattr(compression_study.torch, "set_num_threads", lambda n: None)  # the fixture owns threads
    out = tmp_path / "study"
    args = ["--out", str(out), "--tasks", "2", "--iterations", "1", "--batch-size", "4", "--samples", "8",
            "--keep", "0.6", "--truncation", "--truncation-samples", "4", "--spectra"]
    assert compression_study.main(args) == 0
    for name in ("table.md", "results.json", "storage_quality.png", "truncation.md", "fig4b_truncation.png",
                 "fig4a_spectra.png", "fig14_spectra.png", "spectra.md"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "results.json").read_text())
    assert [r["task"] for r in result["rows"]] == ["fmnist_01", "fmnist_23"]
    for row in result["rows"]:
        assert row["naive"]["stored"] == row["naive"]["naive"]  # a naive task stores all its styles
        assert 0 < row["compressed"]["stored"] < row["naive"]["stored"]
        assert row["ratio"] == pytest.approx(row["compressed"]["stored"] / row["naive"]["stored"])
    table = (out / "table.md").read_text()
    assert f"{result['rows'][1]['compressed']['stored']:,}" in table
    from gmem.models.base import default_base_info
    sha = default_base_info()["sha256"]  # the table names the base it was measured on
    assert result["base_sha256"] == sha and sha in table
    blocks = {line.split("|")[1].strip() for line in (out / "truncation.md").read_text().splitlines()
              if line.startswith("| fc") or line.startswith("| resnet_")}
    assert blocks == {"fc", "resnet_0_0", "resnet_1_0", "resnet_2_0", "resnet_3_0"}
    spectra = result["spectra"]["fmnist_01"]
    assert len(spectra["resnet_0_0.conv_0.gamma"]) == 128 and len(spectra["fc.gamma"]) == 16  # min(O, I)
    assert all(a >= b for a, b in zip(spectra["fc.beta"], spectra["fc.beta"][1:]))  # descending
    assert "| fc.gamma | 16 |" in (out / "spectra.md").read_text()
    (out / "storage_quality.png").unlink()
    assert compression_study.main(["--out", str(out), "--rewrite"]) == 0
    assert (out / "table.md").read_text() == table and (out / "storage_quality.png").is_file()
