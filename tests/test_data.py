"""Datasets: folders, array files, tensors, user Datasets, embedded demo sets, clear errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from gmem.data import (
    ArrayImages,
    DataError,
    ImageFolder,
    InfiniteSampler,
    TensorImages,
    as_dataset,
    demo_datasets,
    load_demo_dataset,
    uint8_to_float,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _check(ds, n, size=16, channels=3):
    assert len(ds) == n
    x = ds[0]
    assert x.shape == (channels, size, size) and x.dtype == torch.float32
    allx = torch.stack([ds[i] for i in range(len(ds))])
    assert allx.min() >= -1 and allx.max() <= 1


def test_uint8_to_float_range_and_layout():
    a = np.zeros((2, 4, 5, 3), np.uint8)
    a[0, 1, 2] = [255, 0, 128]
    x = uint8_to_float(a)
    assert x.shape == (2, 3, 4, 5)
    assert x[0, :, 1, 2].tolist() == [1.0, -1.0, pytest.approx(128 / 127.5 - 1, abs=1e-6)]
    assert x[1].eq(-1).all()


def test_image_folder_recursive_resized_and_labelled(tmp_path):
    rng = np.random.RandomState(0)
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs" / "deep").mkdir(parents=True)
    Image.fromarray(rng.randint(0, 256, (40, 40, 3), np.uint8)).save(tmp_path / "cats" / "a.png")
    Image.fromarray(rng.randint(0, 256, (20, 30), np.uint8), mode="L").save(tmp_path / "cats" / "b.jpg")
    rgba = rng.randint(0, 256, (8, 8, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent -> black
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "dogs" / "deep" / "c.png")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    Image.fromarray(rng.randint(0, 256, (8, 8, 3), np.uint8)).save(tmp_path / ".hidden" / "x.png")
    ds = as_dataset(tmp_path, 16)
    assert isinstance(ds, ImageFolder)
    _check(ds, 3)
    assert ds.classes == ["cats", "dogs"] and ds.labels.tolist() == [0, 0, 1]
    assert torch.equal(ds[2], torch.full((3, 16, 16), -1.0))  # transparent over black (the default)
    g = ds[1]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])  # grey repeated to RGB
    grey = ImageFolder(tmp_path, 8, channels=1)
    assert grey[0].shape == (1, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        as_dataset(tmp_path / "missing", 16)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images found in .*empty"):
        as_dataset(tmp_path / "empty", 16)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="broken.png"):
        as_dataset(tmp_path / "bad", 16)


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw", "nhw1"])
def test_array_files(tmp_path, layout):
    rng = np.random.RandomState(1)
    a = rng.randint(0, 256, (5, 8, 8, 3), np.uint8)
    if layout == "nhw":
        a = a[..., 0]
    elif layout == "nchw":
        a = a.transpose(0, 3, 1, 2)
    elif layout == "nhw1":
        a = a[..., :1]
    np.save(tmp_path / "x.npy", a)
    ds = as_dataset(tmp_path / "x.npy", 16)
    _check(ds, 5)
    labels = np.arange(5)
    np.savez(tmp_path / "x.npz", images=a, labels=labels)
    ds = as_dataset(tmp_path / "x.npz", 8)
    assert isinstance(ds, ArrayImages) and ds.labels.tolist() == labels.tolist()
    if layout == "nhwc":  # same size: values are exactly the uint8 ones scaled to [-1, 1]
        assert torch.equal(ds.images, uint8_to_float(a))


def test_array_file_errors(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((3, 8, 8), np.float32))
    with pytest.raises(DataError, match="f.npy.*uint8"):
        as_dataset(tmp_path / "f.npy", 8)
    np.save(tmp_path / "e.npy", np.zeros((0, 8, 8), np.uint8))
    with pytest.raises(DataError, match="e.npy.*no images"):
        as_dataset(tmp_path / "e.npy", 8)
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 8, 8), np.uint8), b=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match="two.npz.*which array"):
        as_dataset(tmp_path / "two.npz", 8)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.npz"):
        as_dataset(tmp_path / "junk.npz", 8)
    (tmp_path / "a.csv").write_text("1,2")
    with pytest.raises(DataError, match="unsupported"):
        as_dataset(tmp_path / "a.csv", 8)


def test_float_tensor_and_user_dataset():
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    ds = as_dataset(x, 32)
    assert isinstance(ds, TensorImages) and torch.equal(ds.images, x)
    _check(as_dataset(x, 16), 6)
    with pytest.raises(DataError, match=r"\[-1, 1\]"):
        as_dataset(x * 3, 32)
    with pytest.raises(DataError, match="0 rows"):
        as_dataset(torch.zeros(0, 3, 8, 8), 8)
    with pytest.raises(DataError, match="NaN"):
        as_dataset(torch.full((1, 3, 8, 8), float("nan")), 8)

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((1, 8, 8), i, dtype=torch.uint8) * 60, i

    ds = as_dataset(Pairs(), 16)
    _check(ds, 4)
    assert torch.allclose(ds[1], torch.full((3, 16, 16), 60 / 127.5 - 1))
    with pytest.raises(DataError, match="unsupported data type"):
        as_dataset(42, 8)


def test_embedded_demo_sets():
    sets = demo_datasets()
    assert {"emoji", "oxygen_icons", "fashion_mnist"} <= set(sets)
    means = []
    for name in sets:
        ds = load_demo_dataset(name)
        assert len(ds) >= 500 and ds.images.shape[1:] == (3, 32, 32)
        means.append(ds.images.mean(0))
    # Distinct domains: the mean images differ clearly (RMS > 0.2 in [-1, 1] units; measured >= 0.24).
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            assert (means[i] - means[j]).pow(2).mean().sqrt() > 0.2


def test_embedded_source_set():
    from gmem.data import SOURCE_DATA

    ds = as_dataset(str(SOURCE_DATA), 32)
    assert len(ds) >= 5000 and ds.images.shape[1:] == (3, 32, 32)
    assert len(as_dataset("emoji", 32)) == len(load_demo_dataset("emoji"))
    with pytest.raises(DataError, match="unknown demo dataset"):
        load_demo_dataset("nope")


def test_sampler_resumes_identically():
    a = InfiniteSampler(7, 3, seed=5)
    first = [a.next_indices() for _ in range(4)]  # crosses epoch boundaries
    assert all(len(b) == 3 for b in first)
    assert sorted(torch.cat(first[:2] + [first[2][:1]]).tolist()) == list(range(7))
    b = InfiniteSampler(7, 3, seed=5)
    for _ in range(2):
        b.next_indices()
    c = InfiniteSampler(7, 3, seed=5)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(c.next_indices(), x) for x in first[2:])


def test_16_bit_grey_png_keeps_its_levels(tmp_path):
    levels = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16).repeat(4, 0).repeat(4, 1)
    Image.fromarray(levels).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # really stored as 16-bit grey
    x = as_dataset(tmp_path, 8)[0]
    expected = torch.from_numpy(levels.astype(np.float64) / 65535 * 2 - 1).float()
    assert torch.allclose(x[0], expected, atol=1e-5) and torch.equal(x[0], x[2])


def test_transparency_over_a_configurable_background(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "icon.png")
    with pytest.warns(UserWarning, match="transparency.*black"):
        black = as_dataset(tmp_path, 8)[0]
    white = as_dataset(tmp_path, 8, background="white")[0]
    grey = ImageFolder(tmp_path, 8, background=(128, 128, 128))[0]
    assert torch.equal(black[:, 4:], torch.full((3, 4, 8), -1.0)) and torch.equal(white[:, 4:], torch.ones(3, 4, 8))
    assert torch.allclose(grey[:, 4:], torch.full((3, 4, 8), 128 / 127.5 - 1), atol=1e-6)
    assert torch.equal(black[:, :4], white[:, :4])            # opaque pixels do not depend on the background
    with pytest.raises(ValueError, match="background"):
        as_dataset(tmp_path, 8, background="purple")


def test_float_labels_must_be_whole_numbers(tmp_path):
    imgs = np.zeros((3, 8, 8), np.uint8)
    np.savez(tmp_path / "ok.npz", images=imgs, labels=np.array([0.0, 1.0, 2.0]))
    assert as_dataset(tmp_path / "ok.npz", 8).labels.tolist() == [0, 1, 2]
    np.savez(tmp_path / "bad.npz", images=imgs, labels=np.array([0.0, 1.5, 2.0]))
    with pytest.raises(DataError, match="bad.npz.*whole numbers"):
        as_dataset(tmp_path / "bad.npz", 8)


def _png_header_only(path, width, height):
    """A PNG that claims ``width x height`` pixels with almost no data (what a decompression bomb looks like)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_is_a_data_error(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 9000, 9000)      # over gmem's limit, under Pillow's
    with pytest.raises(DataError, match="bomb.png.*9000x9000.*decompression bomb"):
        as_dataset(tmp_path, 8)
    _png_header_only(tmp_path / "bomb.png", 30000, 30000)    # Pillow refuses it already on opening
    with pytest.raises(DataError, match="bomb.png.*decompression bomb"):
        as_dataset(tmp_path, 8)
