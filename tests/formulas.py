"""Independent float64 implementations of the paper's formulas, used to check every backend.

Deliberately naive and written differently from gmem.ops.reference: per-sample weights built
element-wise, the convolution as an explicit unfold + matrix product, no grouping by task.
"""
import torch
import torch.nn.functional as F


def conv_weight_per_sample(weight_norm, gamma, beta, task_ids, n):
    """``[N, O, I, kh, kw]``: W_hat of each sample's task."""
    if task_ids is None:
        g, b = gamma.expand(n, *gamma.shape), beta.expand(n, *beta.shape)
    else:
        g, b = gamma[task_ids], beta[task_ids]
    return g[..., None, None] * weight_norm[None] + b[..., None, None]


def conv2d(x, weight_norm, gamma, beta, bias=None, task_ids=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """``y[n] = conv(x[n], W_hat_t(n)) + bias_t(n)`` by unfolding (float64)."""
    x = x.double()
    n, _, h, w = x.shape
    o, i, kh, kw = weight_norm.shape
    weights = conv_weight_per_sample(weight_norm.double(), gamma.double(), beta.double(), task_ids, n)
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [N, I*kh*kw, L]
    out = torch.einsum("nok,nkl->nol", weights.reshape(n, o, i * kh * kw), cols)
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = out.reshape(n, o, ho, wo)
    if bias is not None:
        b = bias.double()
        if b.ndim == 2:
            b = b[task_ids]
        else:
            b = b.expand(n, o)
        out = out + b[:, :, None, None]
    return out


def linear(x, weight_norm, gamma, beta, bias=None, task_ids=None):
    """``y[n] = (gamma_t[:, None] * Wn + beta_t[:, None]) x[n] + bias_t`` with the weight built (float64)."""
    x = x.double()
    n = x.shape[0]
    if task_ids is None:
        g, b = gamma.double().expand(n, -1), beta.double().expand(n, -1)
    else:
        g, b = gamma.double()[task_ids], beta.double()[task_ids]
    weights = g[:, :, None] * weight_norm.double()[None] + b[:, :, None]  # [N, O, I]
    out = torch.einsum("noi,ni->no", weights, x)
    if bias is not None:
        c = bias.double()
        out = out + (c[task_ids] if c.ndim == 2 else c)
    return out


def conv_nd(x, weight_norm, gamma, beta, bias=None, task_ids=None, stride=1, padding=0, dilation=1, groups=1,
            transposed=False, output_padding=0):
    """mAdaFM of any rank, grouped or transposed, in float64: one sample and one group at a time.

    Each sample's weight is built element-wise; each group runs as its own plain convolution; a
    transposed convolution is the input gradient of the convolution it transposes,
    ``d/dx <conv(x, W), y>`` (so ``F.conv_transpose*d`` is not used).
    """
    rank = weight_norm.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    as_tuple = lambda v: (v,) * rank if isinstance(v, int) else tuple(v)
    stride, padding, dilation, output_padding = map(as_tuple, (stride, padding, dilation, output_padding))
    x, weight_norm = x.double(), weight_norm.double()
    n = x.shape[0]
    if task_ids is None:
        g, b = gamma.double().expand(n, *gamma.shape), beta.double().expand(n, *beta.shape)
    else:
        g, b = gamma.double()[task_ids], beta.double()[task_ids]
    window = (1,) * rank
    outputs = []
    for s in range(n):
        weight = g[s].reshape(*g.shape[1:], *window) * weight_norm + b[s].reshape(*b.shape[1:], *window)
        parts = []
        for j in range(groups):
            if transposed:
                rows = weight.shape[0] // groups
                w_j = weight[j * rows:(j + 1) * rows]  # [C_in/g, C_out/g, *k]: a conv from C_out/g to C_in/g
                y = x[s:s + 1, j * rows:(j + 1) * rows]
                size = [(y.shape[2 + a] - 1) * stride[a] - 2 * padding[a] + dilation[a] * (w_j.shape[2 + a] - 1)
                        + output_padding[a] + 1 for a in range(rank)]
                probe = torch.zeros(1, w_j.shape[1], *size, dtype=torch.float64, requires_grad=True)
                inner = (conv(probe, w_j, None, stride, padding, dilation) * y).sum()
                parts.append(torch.autograd.grad(inner, probe, create_graph=True)[0])
            else:
                cols = x.shape[1] // groups
                rows = weight.shape[0] // groups
                parts.append(conv(x[s:s + 1, j * cols:(j + 1) * cols], weight[j * rows:(j + 1) * rows], None, stride,
                                  padding, dilation))
        outputs.append(torch.cat(parts, 1))
    out = torch.cat(outputs)
    if bias is not None:
        c = bias.double()
        c = c[task_ids] if c.ndim == 2 else c.expand(n, -1)
        out = out + c.reshape(*c.shape, *window)
    return out
