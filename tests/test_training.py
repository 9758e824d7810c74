"""gmem.training: the R1 convention against a closed form, the step's update order and fake reuse,
plug-ins, the loop's honest resume, progress output without a terminal, per-task discriminator heads."""
import copy
import io

import pytest
import torch
from torch import nn

from gmem.data import TensorImages
from gmem.training import (
    EMA,
    GANParts,
    GANStep,
    LossTerm,
    Plugin,
    Progress,
    RealBatches,
    ResumeMismatch,
    StepConfig,
    TrainLoop,
    r1_penalty,
)

C, S, Z = 1, 4, 3  # tiny images [1, 4, 4], latent size 3


def linear_parts(log=None, seed=0):
    """A linear G (z -> image) and D (image -> logit): fast, and their gradients are known."""
    g = torch.Generator().manual_seed(seed)
    G = nn.Linear(Z, C * S * S)
    D = nn.Linear(C * S * S, 1)
    with torch.no_grad():
        for p in list(G.parameters()) + list(D.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    def generate(z, y):
        if log is not None:
            log.append(("G", torch.is_grad_enabled()))
        return torch.tanh(G(z)).view(-1, C, S, S)

    def discriminate(x, y):
        if log is not None:
            log.append(("D", x.detach().clone()))
        return D(x.flatten(1)).squeeze(1)

    return GANParts(generate, discriminate, list(G.parameters()), list(D.parameters()), Z, modules=(G, D)), G, D


def images(n=6, seed=0):
    return TensorImages(torch.rand(n, C, S, S, generator=torch.Generator().manual_seed(seed)) * 2 - 1, S, C)


def make_step(config=None, plugins=(), log=None, data=None, seed=0):
    parts, G, D = linear_parts(log)
    step = GANStep(parts, RealBatches(data or images(), 2, seed), config or StepConfig(), seed, plugins=plugins)
    return step, G, D


# ------------------------------------------------------------------ R1
def test_r1_penalty_matches_the_closed_form_of_a_linear_discriminator():
    torch.manual_seed(0)
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(18, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0], dtype=torch.float64)
    d = (x.flatten(1) * s[:, None]) @ w + 0.7      # grad_x d_i = s_i w
    ref = lambda w: 10.0 * (s ** 2).mean() * (w ** 2).sum()      # gamma * mean_i ||s_i w||^2
    r1 = r1_penalty(d, x)                            # default gamma = 10 (released code's convention)
    torch.testing.assert_close(r1, ref(w))
    torch.testing.assert_close(r1_penalty(d, x, gamma=2.5), ref(w) / 4)
    # differentiable: d r1 / d w = gamma * mean(s^2) * 2 w
    (gw,) = torch.autograd.grad(r1, w)
    torch.testing.assert_close(gw, 10.0 * (s ** 2).mean() * 2 * w.detach())


def test_r1_penalty_rejects_bad_input():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="requires grad"):
        r1_penalty(x.sum(1), x)
    x.requires_grad_(True)
    with pytest.raises(ValueError, match="one logit per image"):
        r1_penalty(x.sum(), x)


def test_step_config_validates():
    for bad, match in ((dict(r1_gamma=-1.0), "r1_gamma"), (dict(ema_decay=1.5), "ema_decay"),
                       (dict(order="x"), "order"), (dict(reuse_fake=True), "reuse_fake"),
                       (dict(lr=float("nan")), "lr"), (dict(r1_every=0), "r1_every")):
        with pytest.raises(ValueError, match=match):
            StepConfig(**bad)


# ------------------------------------------------------------------ update order and fake batches
def test_d_first_draws_fresh_fakes_without_grad_then_updates_g():
    log = []
    step, _, _ = make_step(StepConfig(order="d_first", flip=False, noise=0.0), log=log)
    step.step()
    kinds = [k for k, _ in log]
    assert kinds == ["G", "D", "D", "G", "D"]
    assert log[0][1] is False and log[3][1] is True      # D update's fakes under no_grad, G update with grad


def test_g_first_with_reuse_trains_d_on_the_g_updates_fakes():
    log = []
    step, _, _ = make_step(StepConfig(order="g_first", reuse_fake=True, flip=False, noise=0.0), log=log)
    losses = step.step()
    assert [k for k, _ in log] == ["G", "D", "D", "D"]   # one generator forward only
    g_fake_seen_by_d = log[1][1]
    assert torch.equal(log[3][1], g_fake_seen_by_d)       # D's fake batch is the G update's batch
    assert set(losses) == {"g_loss", "d_real", "d_fake", "r1"}
    # without reuse the D update draws another batch
    log2 = []
    make_step(StepConfig(order="g_first", flip=False, noise=0.0), log=log2)[0].step()
    assert [k for k, _ in log2] == ["G", "D", "G", "D", "D"] and not torch.equal(log2[4][1], log2[1][1])


def test_generator_update_runs_d_with_its_parameters_frozen_and_restores_them():
    # D's parameters do not require grad while D judges the G update's fakes (so no layer computes their
    # weight gradients), do while D trains, and are as before after the step; the updates are unchanged
    seen = []
    parts, G, D = linear_parts()
    judge = parts.discriminate

    def discriminate(x, y):
        seen.append((x.requires_grad, [p.requires_grad for p in D.parameters()]))
        return judge(x, y)

    parts.discriminate = discriminate
    step = GANStep(parts, RealBatches(images(), 2, 0), StepConfig(order="g_first", reuse_fake=True), seed=0)
    step.step()
    assert seen[0] == (True, [False, False])               # G update: fakes carry grad, D frozen
    assert seen[1][1] == [True, True] and seen[2][1] == [True, True]  # D update: D trains
    assert all(p.requires_grad for p in D.parameters())
    assert all(p.requires_grad for p in G.parameters())


def test_frozen_discriminator_gives_the_same_update_as_before():
    # the reference: the same step with D's parameters never frozen (gradients reach only what is asked)
    from gmem.training import step as step_module

    results = []
    for freeze in (True, False):
        saved = step_module._frozen
        if not freeze:
            step_module._frozen = lambda params, keep=(): __import__("contextlib").nullcontext()
        try:
            step, G, D = make_step(StepConfig(order="g_first", reuse_fake=True))
            for _ in range(3):
                step.step()
        finally:
            step_module._frozen = saved
        results.append([p.detach().clone() for p in list(G.parameters()) + list(D.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_step_trains_only_the_given_parameters_and_updates_the_ema():
    parts, G, D = linear_parts()
    frozen = nn.Parameter(torch.ones(3))
    step = GANStep(parts, RealBatches(images(), 2, 0), StepConfig(ema_decay=0.5), seed=0)
    g0 = [p.detach().clone() for p in G.parameters()]
    d0 = [p.detach().clone() for p in D.parameters()]
    step.step()
    assert all(not torch.equal(a, b) for a, b in zip(g0, G.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(d0, D.parameters()))
    for e, a, b in zip(step.ema.shadow, g0, G.parameters()):  # decay 0.5: halfway between old and new
        torch.testing.assert_close(e, 0.5 * a + 0.5 * b.detach())
    assert frozen.grad is None


def test_loss_term_plugin_every_k_iterations():
    calls = []

    def prior(ctx):
        calls.append(ctx.iteration)
        return sum(p.pow(2).sum() for p in ctx.step.parts.g_params)

    seen = []

    class Recorder(Plugin):
        def real_batch(self, ctx):
            return torch.zeros_like(ctx.x_real), ctx.y_real

        def after_step(self, ctx, losses):
            seen.append(dict(losses))

    log = []
    step, _, _ = make_step(plugins=[LossTerm(prior, on="g", every=3, weight=0.1, name="prior"), Recorder()], log=log)
    for _ in range(5):
        step.step()
    assert calls == [0, 3]
    assert ["prior" in s for s in seen] == [True, False, False, True, False]
    real_inputs = [x for k, x in log if k == "D"][::3]   # d_first: the first D call of each step is the real batch
    assert all(torch.equal(x, torch.zeros_like(x)) for x in real_inputs)


def test_ema_warmup_and_applied():
    p = nn.Parameter(torch.zeros(2))
    ema = EMA([p], decay=0.999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.999
    with torch.no_grad():
        p.fill_(1.0)
    ema.update(0)
    torch.testing.assert_close(ema.shadow[0], torch.full((2,), 0.9))
    with ema.applied():
        assert torch.equal(p.detach(), ema.shadow[0])
    assert torch.equal(p.detach(), torch.ones(2))


# ------------------------------------------------------------------ the loop
def run_loop(tmp_path, iterations, data=None, config=None, stop_at=None, **kw):
    step, G, D = make_step(config, data=data)

    def stop(it, losses):
        if it == stop_at:
            raise KeyboardInterrupt

    fingerprint = {"data": "A" if data is None else "B", "config": (config or StepConfig()).to_dict()}
    loop = TrainLoop(step, iterations, out_dir=tmp_path, fingerprint=fingerprint, checkpoint_every=2,
                     progress=False, callbacks=[stop] if stop_at else [],
                     state_fn=lambda: step.state_dict(), load_fn=step.load_state_dict, **kw)
    return loop, step, G, D


def test_loop_resumes_exactly_and_refuses_another_run(tmp_path):
    full_loop, _, G_full, _ = run_loop(tmp_path / "full", 5)
    full_loop.run()
    part, *_ = run_loop(tmp_path / "part", 5, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        part.run()
    resumed, step, G, _ = run_loop(tmp_path / "part", 5)
    metrics = resumed.run()
    assert metrics["iterations_done"] == 5 and step.iteration == 5
    assert all(torch.equal(a, b) for a, b in zip(G_full.parameters(), G.parameters()))
    # other data / other settings: an error naming what differs, unless restart
    with pytest.raises(ResumeMismatch, match="data='A' in the checkpoint, data='B' now"):
        run_loop(tmp_path / "part", 6, data=images(seed=1))[0].run()
    with pytest.raises(ResumeMismatch, match="config.lr"):
        run_loop(tmp_path / "part", 6, config=StepConfig(lr=1e-3))[0].run()
    restarted, step, *_ = run_loop(tmp_path / "part", 2, data=images(seed=1), restart=True)
    assert restarted.run()["iterations_done"] == 2
    assert not list(tmp_path.rglob("*.tmp"))


def test_progress_without_a_terminal_prints_a_few_lines():
    out = io.StringIO()
    bar = Progress(1000, desc="learn x", stream=out)
    for _ in range(1000):
        bar.update({"g_loss": 0.5})
    bar.close()
    lines = out.getvalue().splitlines()
    assert 3 <= len(lines) <= 6 and lines[-1].startswith("learn x: iteration 1000/1000")
    quiet = io.StringIO()
    bar = Progress(10, stream=quiet, enabled=False)
    bar.update()
    assert quiet.getvalue() == ""


# ------------------------------------------------------------------ per-task discriminator heads
def test_task_heads_equal_a_swapped_fc_and_leave_d_alone():
    import gmem.nn as gnn
    from gmem.memory.registry import TaskRegistry
    from gmem.models import Discriminator, Generator

    torch.manual_seed(0)
    reg = TaskRegistry(Generator(32, 2, z_dim=4, embed_size=2), Discriminator(32, 2))
    reg.add("c", 3, {"name": "c", "num_classes": 3})
    with torch.no_grad():
        reg.heads["c"].weight.normal_()
        reg.heads["c"].bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        gnn.style_parameters(reg.D, "c")[0].add_(0.05)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    y = torch.tensor([0, 2, 1, 2])
    fc_before = reg.D.fc
    got = reg.discriminate("c", x, y)
    assert reg.D.fc is fc_before and reg.D.nlabels == 1
    oracle = copy.deepcopy(reg.D)              # the old way: swap fc and nlabels on a copy
    oracle.fc, oracle.nlabels = copy.deepcopy(reg.heads["c"]), 3
    with gnn.use_task(oracle, "c"):
        want = oracle(x, y)
    torch.testing.assert_close(got, want)
    with gnn.use_task(reg.D, "source"):
        torch.testing.assert_close(reg.discriminate("source", x), reg.D(x))
    assert reg.heads.names() == ["c"]
    reg.add("a.b", None, {"name": "a.b"})     # dots are fine in task names
    assert "a.b" in reg.heads and reg.heads.names() == ["c", "a.b"]


def test_library_code_leaves_global_state_alone():
    from gmem.train_base import BaseTrainer

    data = torch.rand(4, 3, 32, 32) * 2 - 1
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    BaseTrainer(data, size=32, nf=2, z_dim=4, embed_size=2, batch_size=2).step()
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), rng)
