"""gmem.nn: drop-in modulated layers and per-task style banks (peft-like).

    import gmem.nn as gnn
    gnn.convert(model)                       # Linear, Conv*d, ConvTranspose*d -> modulated; norms per task
    gnn.add_task(model, "faces")             # starts equal to the source
    opt = torch.optim.Adam(gnn.trainable_parameters(model, "faces"), lr=1e-4)
    with gnn.use_task(model, "faces"):       # per call: thread- and asyncio-safe
        loss = criterion(model(x), y)
    with gnn.use_tasks(model, task_ids):     # one task per sample
        y = model(x)
    plain = gnn.export(model, "faces")       # an ordinary nn.Module computing one task
"""
from .bank import Selection, decode_task, encode_task
from .conv import (
    ModulatedConv1d,
    ModulatedConv2d,
    ModulatedConv3d,
    ModulatedConvNd,
    ModulatedConvTranspose1d,
    ModulatedConvTranspose2d,
    ModulatedConvTranspose3d,
)
from .convert import Converted, convert
from .export import export, unload
from .kinds import MODULATED_LAYERS
from .layers import ConvStyle, LinearStyle, ModulatedLayer, ModulatedLinear
from .per_task import PerTaskModule
from .tasks import (
    add_task,
    count_style_parameters,
    interpolate,
    list_tasks,
    load_style_state_dict,
    modulated_layers,
    per_task_modules,
    remove_task,
    set_backend,
    set_task,
    style_parameters,
    style_state_dict,
    task_index,
    trainable_parameters,
    use_classes,
    use_task,
    use_tasks,
)

__all__ = [
    "ConvStyle",
    "Converted",
    "LinearStyle",
    "MODULATED_LAYERS",
    "ModulatedConv1d",
    "ModulatedConv2d",
    "ModulatedConv3d",
    "ModulatedConvNd",
    "ModulatedConvTranspose1d",
    "ModulatedConvTranspose2d",
    "ModulatedConvTranspose3d",
    "ModulatedLayer",
    "ModulatedLinear",
    "PerTaskModule",
    "Selection",
    "add_task",
    "convert",
    "count_style_parameters",
    "decode_task",
    "encode_task",
    "export",
    "interpolate",
    "list_tasks",
    "load_style_state_dict",
    "modulated_layers",
    "per_task_modules",
    "remove_task",
    "set_backend",
    "set_task",
    "style_parameters",
    "style_state_dict",
    "task_index",
    "trainable_parameters",
    "unload",
    "use_classes",
    "use_task",
    "use_tasks",
]
