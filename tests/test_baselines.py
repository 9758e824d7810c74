"""Baselines (gmem.baselines) and the replay adapter (gmem.memory.replay): closed forms and behaviour on tiny models."""
import pytest
import torch
from torch import nn

from gmem import GANMemory
from gmem.baselines import (
    EWC,
    FineTune,
    Joint,
    MeRGAN,
    ReplayAlignment,
    ReplayMix,
    conditional_copy,
    fisher_diagonal,
)
from gmem.experiments.methods import METHODS, make_learner
from gmem.memory.replay import ReplayGenerator
from gmem.models import Discriminator, Generator
from gmem.seeding import generator, seeded
from gmem.training import Plugin

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models (conftest.py)


@pytest.fixture(scope="module")
def tiny():
    with seeded(0):
        G = Generator(size=8, nf=4, z_dim=8, embed_size=4).eval()
        D = Discriminator(size=8, nf=4).eval()
    return G, D


def images(n, seed):
    return torch.rand(n, 3, 8, 8, generator=generator(seed)) * 2 - 1


class Record(Plugin):
    """Remembers the (possibly replaced) real batches' labels and images."""

    def __init__(self):
        self.labels, self.images = [], []

    def after_step(self, ctx, losses):
        self.labels.append(ctx.y_real.clone())
        self.images.append(ctx.x_real.clone())


# ------------------------------------------------------------------ conditional copies
def test_conditional_copy_starts_every_condition_as_the_base(tiny):
    G, D = tiny
    G2, D2 = conditional_copy(G, D, 3)
    assert G2.nlabels == 3 and D2.nlabels == 3
    z, x = torch.randn(4, 8), images(4, 1)
    with torch.no_grad():
        for c in range(3):
            y = torch.full((4,), c)
            torch.testing.assert_close(G2(z, y), G(z), rtol=0, atol=0)
            torch.testing.assert_close(D2(x, y), D(x), rtol=1e-5, atol=1e-6)  # a 3-row fc rounds differently
    assert all(p.requires_grad for p in G2.parameters())
    with torch.no_grad():  # a copy: training it leaves the base alone
        next(G2.parameters()).add_(1.0)
    assert not torch.equal(next(G2.parameters()), next(G.parameters()))


def test_conditional_copy_rejects_bad_arguments(tiny):
    G, D = tiny
    with pytest.raises(ValueError, match="num_labels"):
        conditional_copy(G, D, 0)
    with pytest.raises(TypeError, match="Generator and Discriminator"):
        conditional_copy(nn.Linear(2, 2), D, 2)
    with pytest.raises(KeyError, match="unknown baseline"):
        make_learner("ewc-gan", G, D, 2)
    with pytest.raises(ValueError, match="mode"):
        MeRGAN(G, D, 2, mode="both")


def test_every_registered_generator_is_a_learner(tiny):
    from gmem.training.learner import Learner

    G, D = tiny
    z = torch.randn(2, 8, generator=generator(3))
    for name, method in METHODS.items():
        if method.make is None:
            continue
        learner = make_learner(name, G, D, 2, tasks=["a", "b"])
        assert isinstance(learner, Learner), name
        learner.learn(images(4, 1), 0, iterations=1, batch_size=2, seed=0)
        assert learner.sample(0, z).shape == (2, 3, 8, 8) and learner.state_dict()
    with pytest.raises(KeyError, match="no generator"):
        make_learner("ewc", G, D, 2)


# ------------------------------------------------------------------ MeRGAN plug-ins
def test_replay_alignment_matches_its_closed_form(tiny):
    G, D = tiny
    learner = FineTune(G, D, 2)
    previous = conditional_copy(G, D, 2)[0].eval().requires_grad_(False)
    with torch.no_grad():  # make the trained generator differ from the frozen one
        for p in learner.G.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator(3)))
    plugin = ReplayAlignment(previous, [1], weight=1e-3, batch_size=5, seed=11)

    class Ctx:  # what the plug-in reads from a step context
        x_real = torch.zeros(1)
        extra = {}

        class step:
            class parts:
                generate = staticmethod(lambda z, y: learner.G(z, y))

    loss = plugin.g_loss_extra(Ctx)
    rng = generator(11)
    z = torch.randn(5, 8, generator=rng)
    c = torch.tensor([1])[torch.randint(1, (5,), generator=rng)]
    g64, p64 = [m.double() for m in (conditional_copy(G, D, 2)[0], conditional_copy(G, D, 2)[0])]
    g64.load_state_dict({k: v.double() for k, v in learner.G.state_dict().items()})
    p64.load_state_dict({k: v.double() for k, v in previous.state_dict().items()})
    expected = 1e-3 * ((g64(z.double(), c) - p64(z.double(), c)) ** 2).sum(dim=(1, 2, 3)).mean()
    assert float(loss.detach()) > 0
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-9)
    assert Ctx.extra["replay_alignment"] == pytest.approx(float(loss.detach()))


def test_replay_mix_replaces_the_old_share_of_the_batch(tiny):
    G, D = tiny
    previous = conditional_copy(G, D, 3)[0].eval().requires_grad_(False)
    plugin = ReplayMix(previous, old=[0, 1], num_new=1, seed=5)

    class Ctx:
        x_real = images(9, 2)
        y_real = torch.full((9,), 2)

    x, y = plugin.real_batch(Ctx)
    assert x.shape == Ctx.x_real.shape
    assert set(y[:6].tolist()) <= {0, 1} and (y[6:] == 2).all()     # 2 old of 3 conditions: 6 of 9 rows
    torch.testing.assert_close(x[6:], Ctx.x_real[6:], rtol=0, atol=0)
    rng = generator(5)
    z = torch.randn(6, 8, generator=rng)
    c = torch.tensor([0, 1])[torch.randint(2, (6,), generator=rng)]
    torch.testing.assert_close(y[:6], c)
    with torch.no_grad():
        torch.testing.assert_close(x[:6], previous(z, c))


def test_mergan_replay_batches_carry_old_conditions_and_joint_all_data(tiny):
    G, D = tiny
    for cls, check in ((lambda: MeRGAN(G, D, 2, mode="replay"), "replay"), (lambda: Joint(G, D, 2), "joint")):
        learner = cls()
        learner.learn(images(6, 1), 0, iterations=1, batch_size=4, seed=0)
        rec = Record()
        learner.learn(images(6, 2), 1, iterations=3, batch_size=4, seed=0, plugins=[rec])
        labels = torch.cat(rec.labels)
        assert set(labels.tolist()) == {0, 1}, check
        assert learner.seen == [0, 1]


def test_replay_alignment_holds_an_old_condition_better_than_fine_tuning(tiny):
    G, D = tiny
    z = torch.randn(16, 8, generator=generator(9))
    drift = {}
    for name, kwargs in (("finetune", {}), ("mergan_ra", {"lambda_ra": 10.0})):
        learner = make_learner(name, G, D, 2, lr=1e-2, **kwargs)
        learner.learn(images(8, 1), 0, iterations=1, batch_size=4, seed=0)
        before = learner.sample(0, z)
        learner.learn(images(8, 2), 1, iterations=3, batch_size=4, seed=1)
        drift[name] = float((learner.sample(0, z) - before).pow(2).mean())
    assert 0 < drift["mergan_ra"] < drift["finetune"]


def test_learn_validates_conditions(tiny):
    G, D = tiny
    learner = FineTune(G, D, 2)
    with pytest.raises(IndexError, match="conditions"):
        learner.learn(images(4, 1), 2, iterations=1, batch_size=2)
    with pytest.raises(ValueError, match="one per image"):
        learner.learn(images(4, 1), torch.zeros(3, dtype=torch.long), iterations=1, batch_size=2)
    assert learner.sample(torch.zeros(0, dtype=torch.long), torch.zeros(0, 8)).shape == (0, 3, 8, 8)


# ------------------------------------------------------------------ EWC
def test_ewc_penalty_and_gradient_match_the_closed_form():
    torch.manual_seed(0)  # restored by the fork below
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = nn.Linear(3, 4).double()
        ewc = EWC(model, lam=1e4)
        anchors = []
        for _ in range(2):
            theta = {n: torch.randn_like(p) for n, p in model.named_parameters()}
            fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
            ewc.add(theta, fisher)
            anchors.append((theta, fisher))
    params = dict(model.named_parameters())
    expected = sum(0.5 * 1e4 * (f[n] * (params[n] - t[n]) ** 2).sum() for t, f in anchors for n in params)
    penalty = ewc.penalty()
    torch.testing.assert_close(penalty, expected)
    grads = torch.autograd.grad(penalty, list(params.values()))
    for (n, p), g in zip(params.items(), grads):
        closed = sum(1e4 * f[n] * (p.detach() - t[n]) for t, f in anchors)
        torch.testing.assert_close(g, closed)
    assert float(EWC(model).penalty()) == 0.0
    with pytest.raises(ValueError, match="lambda"):
        EWC(model, lam=-1)


def test_fisher_diagonal_of_softmax_regression_in_closed_form():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = nn.Linear(5, 3).double()
        x = torch.randn(7, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    fisher = fisher_diagonal(model, x, y)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
        err = p - torch.nn.functional.one_hot(y, 3).double()          # d(-log p_y)/d logits, per sample
        fw = (err[:, :, None] * x[:, None, :]).pow(2).mean(0)
        fb = err.pow(2).mean(0)
    torch.testing.assert_close(fisher["weight"], fw)
    torch.testing.assert_close(fisher["bias"], fb)
    sampled = fisher_diagonal(model, x, seed=3)   # labels drawn from the model: same shapes, >= 0, seeded
    assert all((v >= 0).all() for v in sampled.values())
    torch.testing.assert_close(sampled["weight"], fisher_diagonal(model, x, seed=3)["weight"])


# ------------------------------------------------------------------ replay adapter
@pytest.fixture(scope="module")
def memory(tiny):
    G, D = tiny
    mem = GANMemory.from_base(G, D)
    mem.learn("a", images(8, 1), iterations=1, batch_size=4, seed=0, progress=False)
    mem.learn("b", images(8, 2), iterations=1, batch_size=4, seed=1, progress=False,
              labels=torch.tensor([0, 1] * 4), num_classes=2)
    mem.learn("c", images(8, 3), iterations=1, batch_size=4, seed=2, progress=False)
    return mem


def test_replay_generator_draws_one_mixed_batch(memory):
    names = ["a", "c", "a", "c", "c"]
    replay = ReplayGenerator(memory, seed=4)
    x = replay.generate(5, condition=names)
    z = torch.randn(5, memory.z_dim, generator=generator(4))
    torch.testing.assert_close(x, memory.sample(names, z=z), rtol=0, atol=0)
    torch.testing.assert_close(x[1:2], memory.sample("c", z=z[1:2]), rtol=1e-5, atol=1e-6)
    assert replay.generate(0).shape[0] == 0


def test_replay_generator_labels_and_conditions(memory):
    replay = ReplayGenerator(memory, class_map={"a": [7], "b": [3, 4]}, seed=0)
    x, y, tasks = replay.generate_labelled(40)
    assert x.shape == (40, 3, 8, 8) and set(tasks) == {"a", "b", "c"}
    for t, label in zip(tasks, y.tolist()):
        assert label == {"a": 7, "c": -1}[t] if t != "b" else label in (3, 4)
    _, y4, t4 = replay.generate_labelled(6, condition=4)
    assert set(t4) == {"b"} and (y4 == 4).all()
    _, _, tb = replay.generate_labelled(3, condition="b")
    assert tb == ["b"] * 3
    with pytest.raises(KeyError, match="class 9"):
        replay.generate(2, condition=9)
    with pytest.raises(ValueError, match="lists 1 tasks"):
        replay.generate(2, condition=["a"])
    with pytest.raises(TypeError, match="condition"):
        replay.generate(2, condition=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        replay.generate(True)
    with pytest.raises(ValueError, match="lists 1 classes"):
        ReplayGenerator(memory, class_map={"b": [1]})
