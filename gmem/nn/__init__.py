"""gmem.nn: drop-in modulated layers and per-task style banks (peft-like).

    import gmem.nn as gnn
    gnn.convert(model)                       # nn.Conv2d / nn.Linear -> modulated, base frozen
    gnn.add_task(model, "faces")             # starts equal to the source
    opt = torch.optim.Adam(gnn.style_parameters(model, "faces"), lr=1e-4)
    with gnn.use_task(model, "faces"):
        loss = criterion(model(x), y)
    with gnn.use_tasks(model, task_ids):     # one task per sample
        y = model(x)
"""
from .layers import ConvStyle, LinearStyle, ModulatedConv2d, ModulatedLayer, ModulatedLinear
from .tasks import (
    add_task,
    convert,
    count_style_parameters,
    interpolate,
    list_tasks,
    load_style_state_dict,
    modulated_layers,
    remove_task,
    set_backend,
    set_task,
    style_parameters,
    style_state_dict,
    task_index,
    use_classes,
    use_task,
    use_tasks,
)

__all__ = [
    "ConvStyle",
    "LinearStyle",
    "ModulatedConv2d",
    "ModulatedLayer",
    "ModulatedLinear",
    "add_task",
    "convert",
    "count_style_parameters",
    "interpolate",
    "list_tasks",
    "load_style_state_dict",
    "modulated_layers",
    "remove_task",
    "set_backend",
    "set_task",
    "style_parameters",
    "style_state_dict",
    "task_index",
    "use_classes",
    "use_task",
    "use_tasks",
]
