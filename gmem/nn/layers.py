"""Drop-in modulated layers: a frozen base layer plus a bank of per-task style sets.

Task 0 is ``"source"``: the base layer itself, computed with the frozen weight (bit for bit the
unconverted layer). Task ``k >= 1`` owns a :class:`ConvStyle` / :class:`LinearStyle` with trainable
``gamma``, ``beta`` and ``bias`` (the bias *delta*, ``b_conv`` / ``b_fc`` of the paper; the op
receives ``b + bias``). A new task starts equal to the source: ``gamma = std``, ``beta = mean``,
``bias = 0``. The bank holds only the tasks added, so memory grows with the tasks actually learned.

The bank is an ``nn.ModuleDict`` keyed by task name (:mod:`gmem.nn.bank`). Which task runs is chosen
per call by :func:`gmem.nn.use_task` / :func:`gmem.nn.use_tasks` (a context, thread- and async-safe);
a layer on its own falls back to its ``active_task`` / ``task_ids`` attributes. The convolution
layers are in :mod:`gmem.nn.conv`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .bank import TaskBank, encode_task
from .lowrank import entry_kind, stack_styles

__all__ = ["ModulatedLinear", "ConvStyle", "LinearStyle", "ModulatedLayer"]


class ConvStyle(nn.Module):
    """One task's mAdaFM style set: ``gamma, beta [C_out, C_in/groups]`` (a transposed convolution:
    ``[C_in, C_out/groups]``), ``bias [C_out]``."""

    def __init__(self, gamma: Tensor, beta: Tensor, bias: Tensor):
        super().__init__()
        self.gamma = nn.Parameter(gamma)
        self.beta = nn.Parameter(beta)
        self.bias = nn.Parameter(bias)


class LinearStyle(nn.Module):
    """One task's mFiLM style set: ``gamma, beta [d_out]``, ``bias [d_out]`` or ``[classes, d_out]``.

    A conditional task (paper section 4) keeps one bias row per class; the layer's ``class_ids``
    (set by :func:`gmem.nn.use_classes`) chooses each sample's row.
    """

    def __init__(self, gamma: Tensor, beta: Tensor, bias: Tensor):
        super().__init__()
        self.gamma = nn.Parameter(gamma)
        self.beta = nn.Parameter(beta)
        self.bias = nn.Parameter(bias)


STYLE_GROUPS = ("gamma", "beta", "bias")


class ModulatedLayer(TaskBank):
    """Shared machinery of the modulated layers: the style bank (``styles``, keyed by task name)."""

    style_cls: type[nn.Module]
    bank_attr = "styles"

    def _init_bank(self) -> None:
        super()._init_bank()
        self.backend: str = "auto"

    def source_style(self) -> tuple[Tensor, Tensor, Tensor]:
        """The source task as a style set: ``(std, mean, zeros)`` (derived, never trained)."""
        raise NotImplementedError

    def style(self, index: int) -> tuple:
        """``(gamma, beta, bias_delta)`` of task ``index`` (0 = source).

        ``gamma``/``beta`` are :class:`gmem.ops.LowRank` for a compressed conv task (see
        :mod:`gmem.nn.lowrank`), tensors otherwise.
        """
        if index == 0:
            return self.source_style()
        s = self.entry(index)
        return s.gamma, s.beta, s.bias

    def dense_style(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`style` with LowRank values densified (interpolation, export, studies)."""
        return tuple(v.dense() if isinstance(v, ops.LowRank) else v for v in self.style(index))

    def entry_kind(self, index: int) -> str:
        """``"dense"``, ``"lowrank-training"`` or ``"lowrank"`` (the source is ``"dense"``)."""
        return "dense" if index == 0 else entry_kind(self.entry(index))

    def entry_state(self, index: int) -> dict[str, Tensor]:
        """What task ``index`` stores in this layer (copies): ``gamma, beta, bias`` of a dense entry,
        ``bias`` and ``lowrank.<gamma|beta>.<lam|u|s|v>`` of a compressed one."""
        if index == 0:  # the source: derived from the frozen weight
            return {g: v.detach().clone() for g, v in zip(STYLE_GROUPS, self.source_style())}
        s = self.entry(index)
        if hasattr(s, "state"):
            return s.state()
        return {g: getattr(s, g).detach().clone() for g in STYLE_GROUPS}

    def entry_targets(self, index: int) -> dict[str, Tensor]:
        """The tensors of task ``index`` that a stored state is copied into (all of a dense entry,
        the bias of a compressed one, whose factors live in the knowledge bases)."""
        s = self.entry(index)
        if hasattr(s, "targets"):
            return s.targets()
        return {g: getattr(s, g) for g in STYLE_GROUPS}

    def set_entry(self, index: int, entry: nn.Module) -> None:
        """Replace the bank entry of task ``index >= 1`` (e.g. a dense style set by a low-rank one)."""
        if index == 0:
            raise ValueError("the source task is the frozen base; its style set cannot be replaced")
        self.bank[encode_task(self.task_names[index])] = entry

    def make_entry(self, name: str, init: int = 0, num_classes: Optional[int] = None) -> nn.Module:
        """A style set for a new task, copied from task ``init``; ``num_classes`` gives a per-class bias."""
        gamma, beta, bias = (t.detach().clone() for t in self.dense_style(init))
        if num_classes is not None:
            if not isinstance(self, ModulatedLinear):
                raise ValueError("num_classes: per-class biases exist only for linear layers")
            if bias.ndim == 1:
                bias = bias.expand(num_classes, -1).clone()
            elif bias.shape[0] != num_classes:
                raise ValueError(
                    f"num_classes={num_classes} but task {self.task_names[init]!r} has {bias.shape[0]} classes"
                )
        return self.style_cls(gamma, beta, bias)

    def add_style(self, name: str, init: int = 0, num_classes: Optional[int] = None) -> None:
        """Append a task initialised from task ``init`` (see :meth:`make_entry`)."""
        self.add_entry(name, self.make_entry(name, init, num_classes))

    def remove_style(self, index: int) -> None:
        self.remove_entry(index)

    def modulated_weight(self, gamma: Tensor, beta: Tensor) -> Tensor:
        """``gamma * weight_norm + beta`` for one dense style set, in the weight's shape (export)."""
        return ops.madafm_weight(self.weight_norm, gamma, beta, backend="reference")

    def total_bias(self, bias_delta: Tensor) -> Tensor:
        """``b + bias_delta``: the whole bias the op receives."""
        return bias_delta if self.bias is None else self.bias + bias_delta

    def _stacked_styles(
        self, task_ids: Tensor, with_bias: bool = True
    ) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor, list[int]]:
        """Stack the style sets that ``task_ids`` needs: ``(gamma, beta, bias, local ids, tasks)``.

        ``tasks[j]`` is the task stacked at position ``j``; ``local`` indexes the stack.

        Eagerly only the tasks present are stacked (one host sync for ``unique``), so stored tasks
        cost memory only; under torch.compile and on meta/fake tensors every task is stacked (no
        data-dependent shapes) and the ids are clamped into range after an eager-checked ``use_tasks``
        (see gmem.ops.functional).
        """
        if not ops.values_known(task_ids):  # compile, meta or fake tensors: no data-dependent unique
            tasks = list(range(self.num_tasks))
            local = task_ids
        else:
            present, local = torch.unique(task_ids, sorted=True, return_inverse=True)
            tasks = present.tolist()
            if tasks and (tasks[0] < 0 or tasks[-1] >= self.num_tasks):
                raise IndexError(
                    f"task_ids must lie in [0, {self.num_tasks}) for tasks {self.task_names}, "
                    f"got values from {tasks[0]} to {tasks[-1]}"
                )
        styles = [self.style(t) for t in tasks]
        gamma = stack_styles([s[0] for s in styles])  # LowRank when every task present is compressed
        beta = stack_styles([s[1] for s in styles])
        bias = torch.stack([s[2] for s in styles]) if with_bias else None
        return gamma, beta, bias, local, tasks


class ModulatedLinear(ModulatedLayer):
    """``nn.Linear`` with a frozen base and per-task mFiLM style sets.

    ``x [N, *, d_in]`` -> ``[N, *, d_out]``. Buffers: ``weight_norm [d_out, d_in]``,
    ``weight_mean, weight_std [d_out]`` (row statistics).
    """

    style_cls = LinearStyle

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"ModulatedLinear wraps an nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        weight_norm, mean, std = ops.normalize_weight(self.weight)
        self.register_buffer("weight_norm", weight_norm)
        self.register_buffer("weight_mean", mean)
        self.register_buffer("weight_std", std)
        self._init_bank()

    def source_style(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.weight_std, self.weight_mean, torch.zeros_like(self.weight_std)

    def _class_rows(self, labels: Optional[Tensor], bias: Tensor, task: int, rows: Optional[Tensor] = None) -> Tensor:
        """Each sample's bias row of a conditional task (``bias [classes, d_out]``) by class id."""
        if labels is None:
            raise ValueError(
                f"task {self.task_names[task]!r} is conditional (one bias per class): select classes "
                "with gmem.nn.use_classes(model, labels)"
            )
        if rows is not None:
            labels = labels[rows]
        classes = bias.shape[0]
        if labels.numel() and not torch.compiler.is_compiling():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= classes:
                raise IndexError(f"class ids for task {self.task_names[task]!r} must lie in [0, {classes}), "
                                 f"got {lo}..{hi}")
        return bias[labels]

    def forward(self, x: Tensor) -> Tensor:
        sel = self.selection()
        if sel.task_ids is None and sel.override is None and sel.task == 0:
            return F.linear(x, self.weight, self.bias)  # the source: exactly nn.Linear
        if sel.task_ids is not None:
            if any(s.bias.ndim == 2 for s in self.styles.values()):
                return self._forward_mixed_conditional(x, sel)
            gamma, beta, bias, local, _ = self._stacked_styles(sel.task_ids)
            return ops.modulated_linear(
                x, self.weight_norm, gamma, beta, self.total_bias(bias), task_ids=local, backend=self.backend
            )
        gamma, beta, bias = sel.override or self.style(sel.task)
        if bias.ndim == 1:
            return ops.modulated_linear(x, self.weight_norm, gamma, beta, self.total_bias(bias), backend=self.backend)
        # conditional task: the class's bias row is added per sample after the op
        per_sample = self._class_rows(sel.class_ids, bias, sel.task)
        if per_sample.shape[0] != x.shape[0]:
            raise ValueError(f"class ids must have shape [N] = [{x.shape[0]}], got [{per_sample.shape[0]}]")
        out = ops.modulated_linear(x, self.weight_norm, gamma, beta, self.bias, backend=self.backend)
        return out + per_sample.to(out.dtype).view(x.shape[0], *([1] * (x.ndim - 2)), self.out_features)

    def _forward_mixed_conditional(self, x: Tensor, sel) -> Tensor:
        """Mixed tasks where some are conditional: the op without task biases, then per-sample rows."""
        n = x.shape[0]
        if sel.class_ids is not None and sel.class_ids.shape != (n,):
            raise ValueError(f"class ids must have shape [N] = [{n}], got {tuple(sel.class_ids.shape)}")
        gamma, beta, _, local, tasks = self._stacked_styles(sel.task_ids, with_bias=False)
        per_sample = x.new_zeros(n, self.out_features, dtype=self.weight.dtype)
        for index, task in enumerate(tasks):
            rows = (local == index).nonzero().squeeze(1)
            bias = self.style(task)[2]
            if bias.ndim == 2:
                value = self._class_rows(sel.class_ids, bias, task, rows)
            else:
                value = bias.expand(rows.numel(), -1)
            per_sample = per_sample.index_put((rows,), value)
        out = ops.modulated_linear(x, self.weight_norm, gamma, beta, self.bias, task_ids=local, backend=self.backend)
        return out + per_sample.to(out.dtype).view(n, *([1] * (x.ndim - 2)), self.out_features)

    def plain_module(self, weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
        """A plain ``nn.Linear`` with ``weight [d_out, d_in]`` and ``bias [d_out] | None`` (None:
        ``bias=False``) as its parameters (export, unload)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(weight)
        if bias is not None:
            lin.bias = nn.Parameter(bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tasks={self.task_names}"
