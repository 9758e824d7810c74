"""Task ids under torch.compile: a bad id fails the compiled call and is never used to index
(the graph asserts the range and clamps the ids before any kernel reads them)."""
import pytest
import torch

from gmem import ops


def cpu_backends():
    return [b for b in ("reference", "cpu") if b in ops.available_backends()]


def styles():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 5, 5, generator=g)
    weight_norm, _, _ = ops.normalize_weight(torch.randn(4, 2, 3, 3, generator=g))
    gamma, beta = torch.rand(2, 4, 2, generator=g) + 0.5, torch.randn(2, 4, 2, generator=g)
    return x, weight_norm, gamma, beta


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("op", ["conv", "linear"])
def test_compiled_call_with_a_bad_task_id_fails_and_good_ids_match_eager(backend, op):
    torch._dynamo.reset()
    x, weight_norm, gamma, beta = styles()
    if op == "conv":
        def f(x, ids):
            return ops.modulated_conv2d(x, weight_norm, gamma, beta, task_ids=ids, padding=1, backend=backend)
    else:
        x, weight_norm, gamma, beta = x.flatten(1)[:, :9], weight_norm.flatten(1)[:, :9], gamma[..., 0], beta[..., 0]

        def f(x, ids):
            return ops.modulated_linear(x, weight_norm, gamma, beta, task_ids=ids, backend=backend)

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    good = torch.tensor([1, 0, 1])
    torch.testing.assert_close(compiled(x, good), f(x, good), rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError, match="task_ids must lie in"):
        f(x, torch.tensor([1, 2, 0]))  # eager: checked before anything runs
    for bad in (torch.tensor([1, 2, 0]), torch.tensor([0, -1, 0]), torch.tensor([0, 1000000, 0])):
        with pytest.raises(RuntimeError, match="task_ids must lie in"):
            compiled(x, bad)
