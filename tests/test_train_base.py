"""train-base: a few GP-GAN steps at 32x32 run, change G/D, checkpoint atomically, resume exactly."""
import json

import pytest
import torch

from gmem.cli import build_parser, main
from gmem.models import load_base, load_gan_stability
from gmem.train_base import BaseTrainer, train_base
from gmem.training import augment, r1_penalty

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(size=32, nf=2, z_dim=8, embed_size=4, batch_size=4, sample_every=2, checkpoint_every=2,
            progress=False)


@pytest.fixture
def images():
    return torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _states_equal(a: dict, b: dict) -> None:
    for key in ("generator", "generator_test", "discriminator"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs"
    for key in ("opt_g", "opt_d"):
        for pid, st in a[key]["state"].items():
            for name, v in st.items():
                assert torch.equal(v, b[key]["state"][pid][name]), f"{key} state {pid}.{name} differs"
    assert a["sampler"] == b["sampler"] and a["iteration"] == b["iteration"]
    assert torch.equal(a["rng"], b["rng"])


def test_steps_change_weights_and_write_outputs(tmp_path, images):
    torch.manual_seed(0)
    trainer = train_base(images, tmp_path, iterations=3, **TINY)
    assert trainer.iteration == 3
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == 3
    fresh = BaseTrainer(images, size=32, nf=2, z_dim=8, embed_size=4, batch_size=4)
    for module, key in ((fresh.G, "generator"), (fresh.D, "discriminator")):
        changed = [k for k, v in module.state_dict().items() if not torch.equal(v, ckpt[key][k])]
        assert changed, f"{key} did not train"
    # The EMA generator moved, but only a little (decay 0.999).
    g0, ge, g = fresh.G.state_dict(), ckpt["generator_test"], ckpt["generator"]
    for k in g0:
        assert (ge[k] - g0[k]).abs().max() <= (g[k] - g0[k]).abs().max() + 1e-7
    assert (tmp_path / "samples" / "it_0000002.png").is_file() and (tmp_path / "samples" / "latest.png").is_file()
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines[-1]["it"] == 3 and {"g_loss", "d_real", "d_fake", "r1"} <= set(lines[-1])
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries
    # The checkpoint is in the public GAN_stability layout.
    G, D = load_gan_stability(tmp_path / "checkpoint.pt")
    assert all(torch.equal(v, ge[k]) for k, v in G.state_dict().items())


def test_resume_gives_same_state_as_uninterrupted(tmp_path, images):
    full = train_base(images, tmp_path / "full", iterations=4, **TINY)
    train_base(images, tmp_path / "split", iterations=2, **TINY)
    resumed = train_base(images, tmp_path / "split", iterations=4, **TINY)
    assert resumed.iteration == 4
    _states_equal(full.state_dict(), resumed.state_dict())
    # A finished run resumed with the same target does nothing.
    again = train_base(images, tmp_path / "split", iterations=4, **TINY)
    _states_equal(full.state_dict(), again.state_dict())


def test_resume_refuses_a_different_configuration(tmp_path, images):
    train_base(images, tmp_path, iterations=1, **TINY)
    with pytest.raises(ValueError, match="nf=2"):
        train_base(images, tmp_path, iterations=2, **{**TINY, "nf": 4})


def test_r1_penalty_and_augment():
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    d = (x ** 2).sum(dim=(1, 2, 3))  # grad = 2x -> ||grad||^2 = 4 sum x^2
    expected = (4 * x.detach() ** 2).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(r1_penalty(d, x, gamma=1.0), expected)
    torch.testing.assert_close(r1_penalty(d, x), 10 * expected)  # the released code's default strength
    imgs = torch.linspace(-1, 1, 2 * 3 * 4 * 4).view(2, 3, 4, 4)
    out = augment(imgs, torch.Generator().manual_seed(0))
    assert out.shape == imgs.shape
    for a, o in zip(imgs, out):  # each image is itself or its mirror, plus noise in [0, 1/128)
        d_same, d_flip = o - a, o - a.flip(-1)
        ok = [(d.min() >= 0 and d.max() < 1 / 128) for d in (d_same, d_flip)]
        assert any(ok)
    clamped = augment(imgs, torch.Generator().manual_seed(0), clamp=True)
    assert clamped.max() <= 1 and torch.equal(clamped, out.clamp(-1, 1))
    plain = augment(imgs, torch.Generator().manual_seed(0), flip=False, noise=0.0)
    assert torch.equal(plain, imgs)


def test_cli_train_base_and_export(tmp_path, images, capsys):
    import numpy as np

    arr = ((images[:6] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "d.npz", images=arr)
    rc = main(["train-base", str(tmp_path / "d.npz"), "--out", str(tmp_path / "run"), "--iterations", "2",
               "--nf", "2", "--z-dim", "8", "--embed-size", "4", "--batch-size", "2", "--threads", "1",
               "--export", str(tmp_path / "base")])
    assert rc == 0
    G, D = load_base(tmp_path / "base")
    assert G.config() == dict(size=32, nf=2, z_dim=8, embed_size=4, nlabels=1, channels=3)
    assert main(["train-base", "--out", str(tmp_path / "run"), "--export-only", "--export", str(tmp_path / "b2")]) == 0
    G2, _ = load_base(tmp_path / "b2")
    assert all(torch.equal(v, G2.state_dict()[k]) for k, v in G.state_dict().items())
    assert main(["train-base", str(tmp_path / "missing")]) == 1
    assert "data not found" in capsys.readouterr().err
    assert "train-base" in build_parser().format_help()


def test_paper_configuration_one_step_256():
    """The paper's configuration (256, nf 64) builds and takes one training step on CPU (batch 1)."""
    torch.manual_seed(0)
    data = torch.rand(2, 3, 256, 256) * 2 - 1
    trainer = BaseTrainer(data, size=256, nf=64, z_dim=256, embed_size=256, batch_size=1)
    before = trainer.G.conv_img.weight.clone()
    losses = trainer.step()
    assert trainer.iteration == 1 and all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert not torch.equal(before, trainer.G.conv_img.weight)


def test_init_starts_from_a_saved_base_and_checks_its_architecture(tmp_path, images):
    first = train_base(images, tmp_path / "a", iterations=2, **TINY)
    from gmem.train_base import export_base
    export_base(tmp_path / "a" / "checkpoint.pt", tmp_path / "base")
    G0, D0 = load_base(tmp_path / "base")
    cont = BaseTrainer(images, **{k: v for k, v in TINY.items() if k not in ("sample_every", "checkpoint_every",
                                                                           "progress")})
    cont.init_from_base(tmp_path / "base")
    for mine, theirs in ((cont.G, G0), (cont.G_ema, G0), (cont.D, D0)):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name
    assert not torch.equal(cont.G.fc.weight, first.G.fc.weight)  # the base holds the fp16 EMA generator
    longer = train_base(images, tmp_path / "b", iterations=2, init=tmp_path / "base", **TINY)
    assert longer.config["init"]["iterations"] == 2
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["init"]["sha256"] == json.loads((tmp_path / "base" / "base.json").read_text())["sha256"]
    with pytest.raises(ValueError, match="nf=2 .this run: 4."):
        train_base(images, tmp_path / "c", iterations=1, init=tmp_path / "base", **{**TINY, "nf": 4})


def test_init_run_resumes_only_from_the_same_base(tmp_path, images):
    """A --init run stopped early continues from its checkpoint when started again with the same base;
    with another base (other weights, so another sha256) the checkpoint is refused, naming the base."""
    from gmem.train_base import export_base
    for name, seed in (("base", 0), ("other", 1)):
        train_base(images, tmp_path / f"run_{name}", iterations=1, seed=seed, **TINY)
        export_base(tmp_path / f"run_{name}" / "checkpoint.pt", tmp_path / name)
    train_base(images, tmp_path / "b", iterations=2, init=tmp_path / "base", **TINY)
    resumed = train_base(images, tmp_path / "b", iterations=4, init=tmp_path / "base", **TINY)
    assert resumed.iteration == 4
    assert [json.loads(line)["it"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()
            if '"it"' in line][-1] <= 4
    with pytest.raises(ValueError, match="sha256"):
        train_base(images, tmp_path / "b", iterations=6, init=tmp_path / "other", **TINY)
