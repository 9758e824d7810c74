"""GP-GAN models: public-release names/shapes, checkpoint loading (EMA vs raw), errors, the default base."""
import math

import pytest
import torch
import torch.nn.functional as F

from gmem.models import CheckpointError, Discriminator, Generator, load_base, load_gan_stability, save_base
from gmem.models.base import DEFAULT_BASE_DIR, WEIGHTS_NAME

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _public_block_shapes(blocks, nf):
    """Key -> shape of the residual blocks ``resnet_k_0`` with widths ``blocks`` (multiples of nf)."""
    s = {}
    for k, (fin, fout) in enumerate(blocks):
        fin, fout = fin * nf, fout * nf
        h = min(fin, fout)
        s[f"resnet_{k}_0.conv_0.weight"] = (h, fin, 3, 3)
        s[f"resnet_{k}_0.conv_0.bias"] = (h,)
        s[f"resnet_{k}_0.conv_1.weight"] = (fout, h, 3, 3)
        s[f"resnet_{k}_0.conv_1.bias"] = (fout,)
        if fin != fout:
            s[f"resnet_{k}_0.conv_s.weight"] = (fout, fin, 1, 1)
    return s


def _public_generator_shapes(nf=64, z_dim=256, embed=256, nlabels=1):
    """Key -> shape of the public 'resnet4' 256 generator, written out from the release's layout."""
    s = {"embedding.weight": (nlabels, embed), "fc.weight": (16 * nf * 16, z_dim + embed), "fc.bias": (16 * nf * 16,)}
    blocks = [(16, 16), (16, 16), (16, 8), (8, 4), (4, 2), (2, 1), (1, 1)]
    s.update(_public_block_shapes(blocks, nf))
    s["conv_img.weight"], s["conv_img.bias"] = (3, nf, 7, 7), (3,)
    return s


def _public_discriminator_shapes(nf=64, nlabels=1):
    s = {"conv_img.weight": (nf, 3, 7, 7), "conv_img.bias": (nf,)}
    blocks = [(1, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 16), (16, 16)]
    s.update(_public_block_shapes(blocks, nf))
    s["fc.weight"], s["fc.bias"] = (nlabels, 16 * nf * 16), (nlabels,)
    return s


def test_256_nf64_names_and_shapes_equal_public_release():
    with torch.device("meta"):  # construct only: no memory, no init cost
        G, D = Generator(256, 64, 256, 256, nlabels=1), Discriminator(256, 64, nlabels=1)
    assert {k: tuple(v.shape) for k, v in G.state_dict().items()} == _public_generator_shapes()
    assert {k: tuple(v.shape) for k, v in D.state_dict().items()} == _public_discriminator_shapes()
    assert list(G.state_dict()) == list(_public_generator_shapes())  # same order as the release


def test_256_nf64_forward_batch1():
    torch.manual_seed(0)
    G, D = Generator(256, 64), Discriminator(256, 64)
    with torch.no_grad():
        x = G(torch.randn(1, 256))
        d = D(x)
    assert x.shape == (1, 3, 256, 256) and d.shape == (1,)
    assert x.abs().max() <= 1 and torch.isfinite(d).all()


@pytest.mark.parametrize("size,n_blocks", [(32, 4), (64, 5)])
def test_small_resolutions(size, n_blocks):
    torch.manual_seed(0)
    G = Generator(size, nf=4, z_dim=8, embed_size=4, nlabels=3)
    D = Discriminator(size, nf=4, nlabels=3)
    assert G.n_blocks == D.n_blocks == n_blocks
    assert not hasattr(G, f"resnet_{n_blocks}_0")
    z, y = torch.randn(5, 8), torch.tensor([0, 2, 1, 1, 0])
    x = G(z, y)
    assert x.shape == (5, 3, size, size) and x.abs().max() <= 1
    logits = D(x, y)
    assert logits.shape == (5,)
    # D's fc output is indexed by each sample's label.
    feats = {}
    D.fc.register_forward_hook(lambda m, i, o: feats.setdefault("out", o))
    D(x, y)
    assert torch.equal(logits, feats["out"][torch.arange(5), y])
    # Only plain layers, so gmem.nn.convert can modulate them.
    kinds = {type(m) for m in G.modules()} | {type(m) for m in D.modules()}
    assert kinds <= {Generator, Discriminator, type(G.resnet_0_0), torch.nn.Conv2d, torch.nn.Linear,
                     torch.nn.Embedding}


def test_labels_default_to_zero_and_are_checked():
    torch.manual_seed(0)
    G, D = Generator(32, nf=2, z_dim=4, embed_size=2, nlabels=2), Discriminator(32, nf=2, nlabels=2)
    z = torch.randn(3, 4)
    assert torch.equal(G(z), G(z, torch.zeros(3, dtype=torch.long)))
    x = G(z)
    assert torch.equal(D(x), D(x, torch.zeros(3, dtype=torch.long)))
    with pytest.raises(IndexError, match="label"):
        G(z, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        D(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"z of shape \[N, 4\]"):
        G(torch.randn(3, 5))
    with pytest.raises(ValueError, match="discriminator expects"):
        D(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="size"):
        Generator(48)


def _independent_forward_g(sd, z, y, nf):
    """The generator written out by hand from a raw state dict (no gmem module code)."""
    def block(x, p, fin, fout):
        xs = F.conv2d(x, sd[p + "conv_s.weight"]) if fin != fout else x
        dx = F.conv2d(F.leaky_relu(x, 0.2), sd[p + "conv_0.weight"], sd[p + "conv_0.bias"], padding=1)
        dx = F.conv2d(F.leaky_relu(dx, 0.2), sd[p + "conv_1.weight"], sd[p + "conv_1.bias"], padding=1)
        return xs + 0.1 * dx
    h = F.linear(torch.cat([z, sd["embedding.weight"][y]], 1), sd["fc.weight"], sd["fc.bias"])
    h = h.view(z.shape[0], 16 * nf, 4, 4)
    chans = [(16, 4), (4, 2), (2, 1), (1, 1)]  # size 32
    for k, (fin, fout) in enumerate(chans):
        if k:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = block(h, f"resnet_{k}_0.", fin * nf, fout * nf)
    return torch.tanh(F.conv2d(F.leaky_relu(h, 0.2), sd["conv_img.weight"], sd["conv_img.bias"], padding=3))


def _independent_forward_d(sd, x, y, nf):
    def block(h, p, fin, fout):
        hs = F.conv2d(h, sd[p + "conv_s.weight"]) if fin != fout else h
        dh = F.conv2d(F.leaky_relu(h, 0.2), sd[p + "conv_0.weight"], sd[p + "conv_0.bias"], padding=1)
        dh = F.conv2d(F.leaky_relu(dh, 0.2), sd[p + "conv_1.weight"], sd[p + "conv_1.bias"], padding=1)
        return hs + 0.1 * dh
    h = F.conv2d(x, sd["conv_img.weight"], sd["conv_img.bias"], padding=3)
    for k, (fin, fout) in enumerate([(1, 1), (1, 2), (2, 4), (4, 16)]):
        if k:
            h = F.avg_pool2d(h, 3, stride=2, padding=1)
        h = block(h, f"resnet_{k}_0.", fin * nf, fout * nf)
    out = F.linear(F.leaky_relu(h.flatten(1), 0.2), sd["fc.weight"], sd["fc.bias"])
    return out[torch.arange(x.shape[0]), y]


def _random_state(module, gen):
    return {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in module.state_dict().items()}


@pytest.fixture
def public_checkpoint(tmp_path):
    """A checkpoint in the public layout: random weights, `module.` prefixes, EMA != raw generator."""
    nf, z_dim, embed, nlabels = 4, 16, 8, 3
    gen = torch.Generator().manual_seed(1)
    G, D = Generator(32, nf, z_dim, embed, nlabels), Discriminator(32, nf, nlabels)
    raw, ema, disc = _random_state(G, gen), _random_state(G, gen), _random_state(D, gen)
    pre = lambda sd: {"module." + k: v for k, v in sd.items()}  # noqa: E731
    path = tmp_path / "model.pt"
    torch.save({"generator": pre(raw), "generator_test": pre(ema), "discriminator": pre(disc),
                "g_optimizer": {}, "d_optimizer": {}, "it": 1234, "epoch_idx": 7}, path)
    return path, raw, ema, disc, nf, z_dim, nlabels


def test_load_public_checkpoint_matches_independent_forward(public_checkpoint):
    path, raw, ema, disc, nf, z_dim, nlabels = public_checkpoint
    G, D = load_gan_stability(path)  # use_ema=True by default
    assert (G.size, G.nf, G.z_dim, G.embed_size, G.nlabels) == (32, nf, z_dim, 8, nlabels)
    assert not G.training and not D.training
    z, y = torch.randn(4, z_dim, dtype=torch.float64), torch.tensor([2, 0, 1, 2])
    G, D = G.double(), D.double()
    ema64 = {k: v.double() for k, v in ema.items()}
    disc64 = {k: v.double() for k, v in disc.items()}
    with torch.no_grad():
        x = G(z, y)
        torch.testing.assert_close(x, _independent_forward_g(ema64, z, y, nf), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(D(x, y), _independent_forward_d(disc64, x, y, nf), rtol=1e-10, atol=1e-12)


def test_ema_vs_raw_generator(public_checkpoint):
    path, raw, ema, *_ = public_checkpoint
    G_ema, _ = load_gan_stability(path, use_ema=True)
    G_raw, _ = load_gan_stability(path, use_ema=False)
    for k in raw:
        assert torch.equal(G_ema.state_dict()[k], ema[k])
        assert torch.equal(G_raw.state_dict()[k], raw[k])


def test_checkpoint_errors_name_the_file(tmp_path, public_checkpoint):
    path = public_checkpoint[0]
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_gan_stability(tmp_path / "nope.pt")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged.pt.*cannot read"):
        load_gan_stability(damaged)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_gan_stability(garbage)
    ckpt = torch.load(path, weights_only=True)
    no_ema = tmp_path / "no_ema.pt"
    torch.save({"generator": ckpt["generator"], "discriminator": ckpt["discriminator"]}, no_ema)
    with pytest.raises(CheckpointError, match="no_ema.pt.*generator_test.*use_ema=False"):
        load_gan_stability(no_ema)
    load_gan_stability(no_ema, use_ema=False)
    wrong = tmp_path / "wrong.pt"
    bad_d = dict(ckpt["discriminator"])
    bad_d["module.resnet_1_0.conv_0.weight"] = torch.zeros(5, 5, 3, 3)
    torch.save({**ckpt, "discriminator": bad_d}, wrong)
    with pytest.raises(CheckpointError, match=r"wrong.pt.*discriminator.*resnet_1_0.conv_0.weight"):
        load_gan_stability(wrong)
    not_gan = tmp_path / "not_gan.pt"
    torch.save({"generator_test": {"a": torch.zeros(1)}, "discriminator": {"b": torch.zeros(1)}}, not_gan)
    with pytest.raises(CheckpointError, match="not_gan.pt.*missing tensor"):
        load_gan_stability(not_gan)


def test_save_and_load_base_roundtrip(tmp_path):
    torch.manual_seed(0)
    G, D = Generator(32, nf=2, z_dim=4, embed_size=2), Discriminator(32, nf=2)
    save_base(G, D, tmp_path / "b", dtype=torch.float32, info={"note": "test"})
    G2, D2 = load_base(tmp_path / "b")
    for a, b in ((G, G2), (D, D2)):
        for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
    w = tmp_path / "b" / WEIGHTS_NAME
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged base weights"):
        load_base(tmp_path / "b")


def test_default_base_loads_and_samples():  # the embedded base is committed: fail (not skip) without it
    assert (DEFAULT_BASE_DIR / WEIGHTS_NAME).is_file(), f"{DEFAULT_BASE_DIR / WEIGHTS_NAME} is missing"
    from gmem.models import default_base_info, load_default_base

    G, D = load_default_base()
    info = default_base_info()
    assert G.size == info["generator"]["size"] == 32
    with torch.no_grad():
        x = G(torch.randn(4, G.z_dim, generator=torch.Generator().manual_seed(0)))
        d = D(x)
    assert x.shape == (4, 3, 32, 32) and torch.isfinite(d).all()
    assert x.std() > 0.05  # not collapsed to a constant image
    assert not math.isnan(float(x.mean()))


# ---------------------------------------------------------------- GAN_stability 'resnet4' at every size
# An independent re-implementation of the release's 'resnet4' (written from its structure, no gmem code):
# always 7 residual blocks, start size s0 = size // 64, generator widths 16,16,16,8,4,2,1,1 x nf
# (block k maps width k to width k+1), the discriminator the mirror image.
R4_WIDTHS = [16, 16, 16, 8, 4, 2, 1, 1]


def _r4_shapes(size, nf, z_dim, embed, nlabels):
    """(generator, discriminator) key -> shape tables of a 'resnet4' checkpoint."""
    s0 = size // 64
    g = {"embedding.weight": (nlabels, embed), "fc.weight": (16 * nf * s0 * s0, z_dim + embed),
         "fc.bias": (16 * nf * s0 * s0,)}
    g.update(_public_block_shapes(list(zip(R4_WIDTHS[:-1], R4_WIDTHS[1:])), nf))
    g["conv_img.weight"], g["conv_img.bias"] = (3, nf, 7, 7), (3,)
    rev = R4_WIDTHS[::-1]
    d = {"conv_img.weight": (nf, 3, 7, 7), "conv_img.bias": (nf,)}
    d.update(_public_block_shapes(list(zip(rev[:-1], rev[1:])), nf))
    d["fc.weight"], d["fc.bias"] = (nlabels, 16 * nf * s0 * s0), (nlabels,)
    return g, d


def _r4_block(h, sd, p):
    w0 = sd[p + "conv_0.weight"]
    short = F.conv2d(h, sd[p + "conv_s.weight"]) if p + "conv_s.weight" in sd else h
    dh = F.conv2d(F.leaky_relu(h, 0.2), w0, sd[p + "conv_0.bias"], padding=1)
    dh = F.conv2d(F.leaky_relu(dh, 0.2), sd[p + "conv_1.weight"], sd[p + "conv_1.bias"], padding=1)
    return short + 0.1 * dh


def _r4_generator(sd, z, y, nf, s0):
    h = F.linear(torch.cat([z, sd["embedding.weight"][y]], 1), sd["fc.weight"], sd["fc.bias"])
    h = h.view(z.shape[0], 16 * nf, s0, s0)
    for k in range(7):
        if k:
            h = F.interpolate(h, scale_factor=2)  # nearest
        h = _r4_block(h, sd, f"resnet_{k}_0.")
    return torch.tanh(F.conv2d(F.leaky_relu(h, 0.2), sd["conv_img.weight"], sd["conv_img.bias"], padding=3))


def _r4_discriminator(sd, x, y):
    h = F.conv2d(x, sd["conv_img.weight"], sd["conv_img.bias"], padding=3)
    for k in range(7):
        if k:
            h = F.avg_pool2d(h, 3, stride=2, padding=1)
        h = _r4_block(h, sd, f"resnet_{k}_0.")
    out = F.linear(F.leaky_relu(h.reshape(x.shape[0], -1), 0.2), sd["fc.weight"], sd["fc.bias"])
    return out[torch.arange(x.shape[0]), y]


@pytest.mark.parametrize("size", [64, 128, 256, 512])
def test_resnet4_release_shapes_at_every_size(size):
    """At the release's own width (nf=64) and both label settings, gmem builds exactly the 'resnet4' tables."""
    for nlabels, embed in ((1, 1), (1000, 256)):
        g_shapes, d_shapes = _r4_shapes(size, 64, 256, embed, nlabels)
        with torch.device("meta"):
            G = Generator(size, 64, 256, embed, nlabels, s0=size // 64)
            D = Discriminator(size, 64, nlabels, s0=size // 64)
        assert {k: tuple(v.shape) for k, v in G.state_dict().items()} == g_shapes
        assert {k: tuple(v.shape) for k, v in D.state_dict().items()} == d_shapes
        assert G.config()["size"] == size and G.n_blocks == D.n_blocks == 7


# nf small to keep the test fast: the layout is the same function of nf as at the release's nf=64
@pytest.mark.parametrize("size,nf,nlabels,embed", [(64, 4, 1, 1), (64, 4, 5, 8), (128, 2, 1, 1),
                                                   (128, 2, 3, 16), (256, 2, 1, 1), (512, 1, 2, 4)])
def test_load_resnet4_checkpoint_at_every_size(tmp_path, size, nf, nlabels, embed):
    z_dim, s0 = 16, size // 64
    gen = torch.Generator().manual_seed(size + nlabels)
    g_shapes, d_shapes = _r4_shapes(size, nf, z_dim, embed, nlabels)
    rand = lambda shapes: {k: torch.randn(s, generator=gen) * 0.2 for k, s in shapes.items()}  # noqa: E731
    raw, ema, disc = rand(g_shapes), rand(g_shapes), rand(d_shapes)
    pre = lambda sd: {"module." + k: v for k, v in sd.items()}  # noqa: E731
    path = tmp_path / f"r4_{size}.pt"
    torch.save({"generator": pre(raw), "generator_test": pre(ema), "discriminator": pre(disc), "it": 10}, path)

    G, D = load_gan_stability(path)
    assert (G.size, G.s0, G.n_blocks, G.nf, G.z_dim, G.embed_size, G.nlabels) == (size, s0, 7, nf, z_dim, embed,
                                                                                  nlabels)
    assert (D.size, D.s0, D.nlabels) == (size, s0, nlabels)
    z = torch.randn(2, z_dim, generator=gen)
    y = torch.tensor([nlabels - 1, 0])
    with torch.no_grad():
        x = G(z, y)
        assert x.shape == (2, 3, size, size)
        torch.testing.assert_close(x, _r4_generator(ema, z, y, nf, s0))
        torch.testing.assert_close(D(x, y), _r4_discriminator(disc, x, y))
        G_raw, _ = load_gan_stability(path, use_ema=False)
        torch.testing.assert_close(G_raw(z, y), _r4_generator(raw, z, y, nf, s0))
    # the config round-trips through the constructor (GANMemory and save_base rebuild models from it)
    assert Generator(**G.config()).config() == G.config()
    assert Generator(**G.config()).s0 == Discriminator(**D.config()).s0 == s0


def test_default_start_size_keeps_stored_configs():
    """Models with the default s0 = 4 report the same config as before s0 existed (old base.json files)."""
    G, D = Generator(32, nf=2, z_dim=4, embed_size=2), Discriminator(32, nf=2)
    assert G.config() == dict(size=32, nf=2, z_dim=4, embed_size=2, nlabels=1, channels=3)
    assert D.config() == dict(size=32, nf=2, nlabels=1, channels=3)
    assert Generator(256, 2, 4, 2, s0=4).state_dict().keys() == Generator(256, 2, 4, 2).state_dict().keys()
    with pytest.raises(ValueError, match="s0"):
        Generator(64, 2, s0=0)
    with pytest.raises(ValueError, match="size must be s0"):
        Discriminator(96, 2, s0=2)


def test_resnet4_bad_fc_names_the_tensor(tmp_path):
    g_shapes, d_shapes = _r4_shapes(128, 2, 8, 1, 1)
    sd_g = {k: torch.zeros(s) for k, s in g_shapes.items()}
    sd_d = {k: torch.zeros(s) for k, s in d_shapes.items()}
    sd_g["fc.weight"], sd_g["fc.bias"] = torch.zeros(3 * 32, 9), torch.zeros(3 * 32)  # 3 is no square
    torch.save({"generator_test": sd_g, "discriminator": sd_d}, tmp_path / "bad_fc.pt")
    with pytest.raises(CheckpointError, match=r"bad_fc.pt: generator fc weight \(96, 9\) does not fit nf=2"):
        load_gan_stability(tmp_path / "bad_fc.pt")
    sd_g["fc.weight"], sd_g["fc.bias"] = torch.zeros(32, 9), torch.zeros(32)  # s0 = 1 but D's fc says 2
    torch.save({"generator_test": sd_g, "discriminator": sd_d}, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match=r"mismatch.pt: discriminator fc weight .* start size 1"):
        load_gan_stability(tmp_path / "mismatch.pt")
