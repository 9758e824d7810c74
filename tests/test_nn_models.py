"""gmem.nn on real third-party models: torchvision resnet18 (BatchNorm), a tiny torchvision ViT
(LayerNorm, Linear, patch conv, nn.MultiheadAttention) and the GP-GAN G/D of gmem.models.

The promise tested: after training new tasks in train mode with an optimizer over
``trainable_parameters``, the source equals the unconverted model bit for bit and every earlier task
equals its own earlier output bit for bit; export and unload give plain models.
"""
import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn

import gmem.nn as gnn
from gmem.models import Discriminator, Generator


def resnet18():
    return torchvision.models.resnet18(num_classes=10)


def vit():
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


class GANPair(nn.Module):
    """G and D of gmem.models chained (D(G(z))) so one model holds both, as a GAN step runs them."""

    def __init__(self):
        super().__init__()
        self.G = Generator(32, 4, z_dim=8, embed_size=4)
        self.D = Discriminator(32, 4)

    def forward(self, z):
        return self.D(self.G(z))


def image_batch(n=4, seed=1, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def small_image_batch(n=3, seed=1):
    # resnet18 at 16 x 16: layer3/4 run at 1 x 1, still n values per BatchNorm channel; keeps it fast
    return image_batch(n, seed, size=16)


def latent_batch(n=4, seed=1):
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


CASES = {"resnet18": (resnet18, small_image_batch), "vit": (vit, image_batch), "gan": (GANPair, latent_batch)}


def build(kind, seed=0):
    make, inputs = CASES[kind]
    torch.manual_seed(seed)
    model = make()
    base = copy.deepcopy(model)
    return model, base, inputs


def train_task(model, task, x, steps=3):
    """A few optimizer steps of ``task`` in train mode over exactly trainable_parameters."""
    opt = torch.optim.Adam(gnn.trainable_parameters(model, task), lr=1e-2)
    model.train()
    for _ in range(steps):
        with gnn.use_task(model, task):
            loss = (model(x).float() - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def perturb(model, task, seed=0):
    """Give ``task`` values of its own without the cost of training (styles, norm affine parameters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gnn.trainable_parameters(model, task):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def outputs(model, x, task):
    with torch.no_grad(), gnn.use_task(model, task):
        return model(x)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_training_new_tasks_keeps_source_and_earlier_tasks_bit_for_bit(kind):
    model, base, inputs = build(kind)
    x = inputs()
    base_state = copy.deepcopy(base.state_dict())
    model.eval(), base.eval()
    converted = gnn.convert(model)
    assert converted and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        expected_source = base(x)
    gnn.add_task(model, "one")
    params = gnn.trainable_parameters(model, "one")
    assert all(p.requires_grad for p in params)
    train_task(model, "one", x)
    out_one = outputs(model, x, "one")
    assert not torch.allclose(out_one, expected_source), "training changed nothing: the test would be vacuous"
    state_one = gnn.style_state_dict(model, "one")
    gnn.add_task(model, "two", init="one")
    train_task(model, "two", x * 0.5 + 1)
    assert torch.equal(outputs(model, x, "source"), expected_source)
    with torch.no_grad():
        assert torch.equal(model(x), expected_source)  # no selection: the source
    assert torch.equal(outputs(model, x, "one"), out_one)
    assert not torch.equal(outputs(model, x, "two"), out_one)
    for key, value in gnn.style_state_dict(model, "one").items():
        assert torch.equal(value, state_one[key]), key  # running statistics included
    # the base itself is untouched: unload gives the original state dict and outputs
    plain = gnn.unload(model)
    state = plain.state_dict()
    assert state.keys() == base_state.keys()
    assert all(torch.equal(state[k], base_state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), expected_source)
    assert [n for n, p in plain.named_parameters() if not p.requires_grad] == []


@pytest.mark.parametrize("kind", sorted(CASES))
def test_export_is_a_plain_model_computing_the_task(kind):
    model, _, inputs = build(kind)
    x = inputs()
    model.eval()
    gnn.convert(model)
    gnn.add_task(model, "one")
    perturb(model, "one")
    plain = gnn.export(model, "one")
    assert all(not type(m).__module__.startswith("gmem.nn") for m in plain.modules())
    assert not any(isinstance(m, (gnn.ModulatedLayer, gnn.PerTaskModule)) for m in plain.modules())
    clone = pickle.loads(pickle.dumps(plain))
    with torch.no_grad():
        expected = outputs(model, x, "one")
        torch.testing.assert_close(plain.eval()(x), expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(clone.eval()(x), plain(x))
    assert gnn.list_tasks(model) == ["source", "one"]  # the converted model is unchanged


def test_resnet18_converts_every_conv_and_linear_and_copies_every_batchnorm():
    model, base, _ = build("resnet18")
    names = gnn.convert(model)
    convs = [n for n, m in base.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    norms = [n for n, m in base.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert list(names) == convs and names.skipped == []
    assert sorted(names.per_task) == sorted(norms)
    gnn.add_task(model, "a")
    # the task's norms are its own copies: trainable_parameters = styles + those copies
    n_norm = sum(p.numel() for n in norms for p in base.get_submodule(n).parameters())
    assert sum(p.numel() for p in gnn.trainable_parameters(model, "a")) == (
        gnn.count_style_parameters(model, "a") + n_norm
    )


def test_vit_skips_attention_projections_and_reports_them():
    model, base, _ = build("vit")
    with pytest.warns(UserWarning, match="left unmodulated"):
        names = gnn.convert(model)
    skipped = dict(names.skipped)
    attn = [n for n, m in base.named_modules() if isinstance(m, nn.MultiheadAttention)]
    # every module with weights of its own that stays shared is listed: the attention modules (their
    # in_proj_weight), their out_proj, the model's class token and the encoder's position embedding
    assert attn and sorted(skipped) == sorted(["", "encoder", *attn, *(f"{n}.out_proj" for n in attn)])
    assert all("MultiheadAttention" in skipped[n] and "exclude=[name]" in skipped[n] for n in attn)
    assert all("MultiheadAttention" in skipped[f"{n}.out_proj"] for n in attn)
    assert "class_token" in skipped[""] and "pos_embedding" in skipped["encoder"]
    assert names.chosen == []
    assert "conv_proj" in names and "heads.head" in names
    assert any(n.endswith("mlp.0") for n in names)
    norms = [n for n, m in base.named_modules() if isinstance(m, nn.LayerNorm)]
    assert sorted(names.per_task) == sorted(norms)
    # the skipped projections stay the plain (frozen) modules the attention reads
    for n in attn:
        assert type(model.get_submodule(n).out_proj) is type(base.get_submodule(n).out_proj)


def test_per_task_batchnorm_mixed_batches():
    model, _, inputs = build("resnet18")
    x = inputs(n=4)
    gnn.convert(model)
    gnn.add_task(model, "a")
    perturb(model, "a")
    ids = torch.tensor([1, 0, 0, 1])
    model.train()
    with gnn.use_tasks(model, ids), pytest.raises(ValueError, match="mixed-task batch"):
        model(x)
    model.eval()
    with torch.no_grad(), gnn.use_tasks(model, ids):
        mixed = model(x)
    for n, t in enumerate(ids.tolist()):
        torch.testing.assert_close(mixed[n], outputs(model, x[n:n + 1], t)[0], rtol=1e-5, atol=1e-5)


def test_per_task_and_shared_globs():
    model, base, inputs = build("resnet18")
    x = inputs()
    names = gnn.convert(model, per_task=["fc"], shared=["bn1"])
    assert "fc" not in names and "fc" in names.per_task and "bn1" not in names.per_task
    assert isinstance(model.bn1, nn.BatchNorm2d) and isinstance(model.fc, gnn.PerTaskModule)
    gnn.add_task(model, "a")
    fc_params = set(map(id, model.fc.copies["a"].parameters()))
    assert fc_params <= set(map(id, gnn.trainable_parameters(model, "a")))
    base.eval()
    stats = model.bn1.running_mean.clone()
    train_task(model, "a", x, steps=1)
    # a shared BatchNorm is shared: training in train mode moves its running statistics ...
    assert not torch.equal(model.bn1.running_mean, stats)
    with torch.no_grad():
        model.bn1.running_mean.copy_(stats)
        model.bn1.running_var.copy_(base.bn1.running_var)
        model.bn1.num_batches_tracked.zero_()
    # ... unless it stays in eval mode while the task trains
    opt = torch.optim.Adam(gnn.trainable_parameters(model, "a"), lr=1e-2)
    model.train()
    model.bn1.eval()
    with gnn.use_task(model, "a"):
        (model(x) - 1).pow(2).mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        assert torch.equal(outputs(model, x, "source"), base(x))
