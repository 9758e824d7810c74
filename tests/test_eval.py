"""gmem.eval: the Fréchet distance (hand-computable cases, pytorch-fid agreement), pixFID, Inception errors."""
import numpy as np
import pytest
import torch

from gmem.eval import frechet_distance, gaussian_stats, inception_fid, pixel_fid


def test_frechet_distance_hand_computed():
    # identical Gaussians: 0
    s = np.diag([1.0, 2.0, 3.0])
    assert frechet_distance(np.zeros(3), s, np.zeros(3), s) == pytest.approx(0.0, abs=1e-12)
    # diagonal covariances: |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = np.array([1.0, 0.0]), np.array([0.0, 2.0])
    a, b = np.array([4.0, 1.0]), np.array([1.0, 9.0])
    expected = 1.0 + 4.0 + (2 - 1) ** 2 + (1 - 3) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # 1-d case with torch inputs
    assert frechet_distance(torch.tensor([0.0]), torch.tensor([[4.0]]), torch.tensor([3.0]),
                            torch.tensor([[1.0]])) == pytest.approx(9 + 1, rel=1e-12)


@pytest.mark.parametrize("d,n", [(5, 200), (17, 40), (30, 10)])  # the last: singular covariances
def test_frechet_distance_matches_pytorch_fid(d, n):
    from pytorch_fid.fid_score import calculate_frechet_distance

    g = np.random.default_rng(d)
    x = g.normal(size=(n, d)) @ g.normal(size=(d, d))
    y = g.normal(size=(n, d)) * 2 + 0.5
    mx, sx = gaussian_stats(torch.from_numpy(x))
    my, sy = gaussian_stats(torch.from_numpy(y))
    ours = frechet_distance(mx, sx, my, sy)
    theirs = calculate_frechet_distance(mx, sx, my, sy)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-6)
    assert frechet_distance(mx, sx, mx, sx) == pytest.approx(0.0, abs=1e-6 * np.trace(sx))


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


def test_pixel_fid_orders_distributions():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(64, 3, 16, 16, generator=g) * 2 - 1
    b = torch.rand(64, 3, 16, 16, generator=g) * 2 - 1
    shifted = (b * 0.5 + 0.4).clamp(-1, 1)
    assert pixel_fid(a, b) < pixel_fid(a, shifted)


def test_inception_fid_needs_local_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="TORCH_HOME"):
        inception_fid(x, x)
