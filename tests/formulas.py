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
