"""Converted models under torch.autocast: computed in the autocast dtype on every backend, as the
unconverted model would be; float32 parameters keep float32 gradients.

Tolerances (max abs error over max |float32 value|, forward output and style gradients), one table:
bfloat16 has 8 mantissa bits (2^-8 = 0.0039 relative rounding per value), float16 has 11.
"""
import copy

import pytest
import torch
from torch import nn

import gmem.nn as gnn
from gmem import ops

TOLERANCE = {  # dtype -> (forward, backward) relative to the float32 result's largest magnitude
    torch.bfloat16: (3e-2, 1e-1),  # gradients: sums of bf16 products, worst element of each tensor
    torch.float16: (5e-3, 1e-2),
}


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 2 * 2, 6), nn.LayerNorm(6), nn.Linear(6, 3),
    )


def converted(backend):
    model = net()
    base = copy.deepcopy(model).eval()
    gnn.convert(model)
    model.eval()
    gnn.add_task(model, "a")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in gnn.trainable_parameters(model, "a"):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    gnn.set_backend(model, backend)
    return model, base


def cpu_backends():
    names = ["reference"] + [b for b in ("cpu", "triton") if b in ops.available_backends()]
    return names


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def forward_backward(model, x, device_type, dtype):
    for p in gnn.trainable_parameters(model, "a"):
        p.grad = None
    with gnn.use_task(model, "a"), torch.autocast(device_type, dtype, enabled=dtype is not None):
        out = model(x)
    out.float().pow(2).sum().backward()
    return out, [p.grad.clone() for p in gnn.trainable_parameters(model, "a")]


def check_against_float32(backend, device, dtype):
    model, base = converted(backend)
    model, base = model.to(device), base.to(device)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)).to(device)
    out32, grads32 = forward_backward(model, x, device.type, None)
    out, grads = forward_backward(model, x, device.type, dtype)
    assert out.dtype == dtype and out32.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads)  # parameters and gradients stay float32
    tol_fwd, tol_bwd = TOLERANCE[dtype]
    fwd = rel_err(out, out32)
    bwd = max(rel_err(g, g32) for g, g32 in zip(grads, grads32))
    assert fwd < tol_fwd, f"{backend} {dtype} forward relative error {fwd}"
    assert bwd < tol_bwd, f"{backend} {dtype} backward relative error {bwd}"
    # the source is the unconverted model under autocast, bit for bit
    with torch.no_grad(), torch.autocast(device.type, dtype):
        assert torch.equal(model(x), base(x))
    return fwd, bwd


@pytest.mark.parametrize("backend", cpu_backends())
def test_cpu_bfloat16_autocast_matches_float32(backend):
    check_against_float32(backend, torch.device("cpu"), torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "cuda", "triton"])
def test_cuda_autocast_matches_float32(backend, dtype):
    if backend not in ops.available_backends():
        pytest.skip(f"backend {backend} not available")
    check_against_float32(backend, torch.device("cuda"), dtype)


def test_custom_ops_carry_the_autocast_rule():
    x = torch.randn(2, 3, 5, 5)
    weight_norm, _, _ = ops.normalize_weight(torch.randn(4, 3, 3, 3))
    gamma, beta = torch.rand(4, 3) + 0.5, torch.randn(4, 3) * 0.1
    with torch.autocast("cpu", torch.bfloat16), ops.use_backend("reference"):
        out = torch.ops.gmem.modulated_conv2d(x, weight_norm, gamma, beta, None, None, [1, 1], [0, 0], [1, 1])
        lin = torch.ops.gmem.modulated_linear(x.flatten(1)[:, :7], torch.randn(4, 7), gamma[:, 0], beta[:, 0],
                                              None, None)
    assert out.dtype == torch.bfloat16 and lin.dtype == torch.bfloat16
    expected = ops.modulated_conv2d(x.bfloat16(), weight_norm.bfloat16(), gamma.bfloat16(), beta.bfloat16(),
                                    backend="reference")
    assert torch.equal(out, expected)
    with torch.autocast("cpu", torch.bfloat16):  # float64 is left alone, as by F.conv2d
        y = ops.modulated_conv2d(x.double(), weight_norm.double(), gamma.double(), beta.double())
        assert y.dtype == torch.float64


def test_grad_scaler_training_step_on_cpu():
    model, _ = converted("reference")
    model.train()
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    params = gnn.trainable_parameters(model, "a")
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    with gnn.use_task(model, "a"), torch.autocast("cpu", torch.bfloat16):
        loss = model(x).float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
