"""Plain PyTorch models back from a converted one: one task (:func:`export`), or the original (:func:`unload`).

What the two promise:

* :func:`unload` gives the unconverted model bit for bit: the original parameter objects' values,
  the same state dict (keys included), the ``requires_grad`` flags from before :func:`gmem.nn.convert`,
  every module reached under several names still one module, every parameter tied between modules
  (``head.weight = emb.weight``) still one parameter.
* :func:`export` gives a model of the unconverted architecture computing one task: each modulated
  layer becomes its plain kind with the task's weight ``gamma * weight_norm + beta`` (the float32
  rounding of the modulated op) and bias, each per-task module the task's copy. It loads into the
  stock architecture (``load_state_dict(strict=True)``) except where a task gave a bias to a layer
  built without one and that bias cannot be folded exactly into what follows; the returned model's
  ``export_report`` (a plain dict, see :func:`export`) names those layers. A parameter tied between a
  modulated layer and another module is untied where the task changes it (reported too): the other
  module still reads the source's values in the converted model, and the export computes the same.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .convert import module_names, original_requires_grad
from .layers import ModulatedLayer
from .per_task import PerTaskModule
from .tasks import Task, _banks, list_tasks, task_index

__all__ = ["export", "unload"]


def _plain_layer(layer: ModulatedLayer, weight: nn.Parameter, bias: Optional[nn.Parameter]) -> nn.Module:
    """The plain kind of ``layer`` holding exactly ``weight``/``bias`` (these objects, so that a
    parameter tied to another module stays one parameter in the copy)."""
    plain = layer.plain_module(weight, bias)
    plain.weight = weight
    if bias is not None:
        plain.bias = bias
    return plain


def _task_layer(name: str, layer: ModulatedLayer, index: int) -> tuple[nn.Module, Optional[Tensor]]:
    """The plain layer of task ``index``, and the bias the task gave a layer built without one (or None)."""
    if index == 0:
        return _plain_layer(layer, layer.weight, layer.bias), None
    gamma, beta, delta = (v.detach() for v in layer.dense_style(index))
    if delta.ndim != 1:
        raise ValueError(
            f"export: task {layer.task_names[index]!r} is conditional (one bias per class in {name!r}): a plain "
            "layer has one bias; export is for unconditional tasks"
        )
    weight = layer.modulated_weight(gamma, beta).contiguous()
    gained = None
    if layer.bias is not None:
        bias = nn.Parameter(layer.total_bias(delta).clone())
    elif torch.count_nonzero(delta) == 0:
        bias = None  # the task left the bias alone: the stock layer has none
    else:
        bias, gained = nn.Parameter(delta.clone()), delta.clone()
    return _plain_layer(layer, nn.Parameter(weight), bias), gained


def _plain(model: nn.Module, index: int) -> tuple[nn.Module, dict[str, Tensor], list[str]]:
    """A copy of ``model`` with every task-aware module replaced by the plain one of task ``index``.

    Returns ``(copy, {layer name: bias gained}, [names of parameters the task untied])``. The copy
    is made in one ``deepcopy`` together with the plain modules, so parameters shared between
    modules stay one parameter (for the source they are the layers' own parameter objects).
    """
    banks = _banks(model)
    aliases = module_names(model)
    plain: dict[int, nn.Module] = {}
    gained: dict[str, Tensor] = {}
    untied: list[str] = []
    shared_names: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        shared_names.setdefault(id(p), []).append(pname)
    with torch.no_grad():
        for name, bank in banks:
            if isinstance(bank, PerTaskModule):
                plain[id(bank)] = bank.module(index)
                continue
            plain[id(bank)], bias = _task_layer(name, bank, index)
            if bias is not None:
                gained[name] = bias
            if index != 0:  # the weight's other names, outside this layer's own aliases
                untied += [n for n in shared_names[id(bank.weight)] if n.rpartition(".")[0] not in aliases[id(bank)]]
    memo = {id(bank): None for _, bank in banks}  # the banks themselves are replaced, not copied
    out, plain = copy.deepcopy((model, plain), memo)
    for _, bank in banks:
        for alias in aliases[id(bank)]:
            parent_name, _, attr = alias.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, attr, plain[id(bank)])
    return out, gained, sorted(set(untied))


def _fold_into_batchnorm(model: nn.Module, gained: dict[str, Tensor]) -> tuple[dict[str, str], str]:
    """Fold each gained bias into the BatchNorm that alone reads its layer's output, in place.

    ``BN(conv(x) + b)`` equals ``BN'(conv(x))`` with ``running_mean' = running_mean - b`` (eval mode:
    exactly up to rounding; train mode: the batch mean absorbs ``b`` and the running mean tracks the
    same values shifted by ``b``). Found on the ``torch.fx`` graph: the layer is called once, its
    output feeds only a BatchNorm with running statistics, called once. Returns ``({layer: batchnorm},
    why tracing failed or "")``.
    """
    if not gained:
        return {}, ""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # any model torch.fx cannot trace: report instead of folding
        return {}, f"torch.fx could not trace the model ({type(e).__name__}: {e})"
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    aliases = module_names(model)
    folded = {}
    for name, bias in gained.items():
        layer = model.get_submodule(name)
        traced = [n for alias in aliases[id(layer)] for n in calls.get(alias, [])]
        if len(traced) != 1 or len(traced[0].users) != 1:
            continue
        (user,) = traced[0].users
        if user.op != "call_module" or len(calls.get(user.target, [])) != 1:
            continue
        norm = model.get_submodule(user.target)
        if not isinstance(norm, _BatchNorm) or norm.running_mean is None or norm.num_features != bias.numel():
            continue
        if len(aliases[id(norm)]) != 1:
            continue
        with torch.no_grad():
            norm.running_mean.sub_(bias.to(norm.running_mean.dtype))
        layer.bias = None
        folded[name] = user.target
    return folded, ""


def export(model: nn.Module, task: Task) -> nn.Module:
    """A plain PyTorch copy of ``model`` computing ``task`` (``model`` is not changed).

    Every modulated layer becomes its plain kind with the task's weight ``gamma * weight_norm + beta``
    and bias, every per-task module the task's copy; nothing of gmem remains inside. Parameters are
    trainable. A task's bias on a layer built without one is folded into the BatchNorm that alone
    reads that layer's output (its running mean shifts by the bias: the same outputs, the stock
    state-dict keys); where no such BatchNorm follows, the layer keeps the bias and the model no
    longer loads strictly into the stock architecture.

    The returned model's ``export_report`` attribute (plain data) says which:
    ``{"task": name, "folded_bias": {layer: batchnorm}, "gained_bias": [layers with a bias the stock
    layer lacks], "untied": [parameters that were tied to a modulated layer's weight and now keep the
    source's values], "note": why folding was not tried (or "")}``.
    """
    index = task_index(model, task)
    out, gained, untied = _plain(model, index)
    folded, note = _fold_into_batchnorm(out, gained)
    for p in out.parameters():
        p.requires_grad_(True)
    out.export_report = {
        "task": list_tasks(model)[index],
        "folded_bias": folded,
        "gained_bias": sorted(set(gained) - set(folded)),
        "untied": untied,
        "note": note,
    }
    return out


def unload(model: nn.Module) -> nn.Module:
    """The unconverted model (a copy; ``model`` is not changed): original weights, norms and
    ``requires_grad`` flags, the same state dict and outputs as before :func:`gmem.nn.convert`, reused
    modules and tied parameters as they were."""
    out, _, _ = _plain(model, 0)
    flags = original_requires_grad(model)
    for name, p in out.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))
    return out
