"""Checks the ``gmem`` commands run before any work (preflight), opening a memory, and image output by suffix.

Every check raises ValueError (or an OSError with an errno) with a message meant for one line of
``gmem <command>: error: ...``, so a user mistake is reported before training starts, not after.
"""
from __future__ import annotations

import math
import os
import secrets
from pathlib import Path

MAX_BATCH_SIZE = 1_000_000
# Training keeps several copies of each sample's activations alive (generator and discriminator
# forward/backward, the R1 double backward, the fake pass): a conservative multiple for the estimate.
ACTIVATION_COPIES = 8


def check_number(value, option: str, low: float = -math.inf, high: float = math.inf, *, low_open=False) -> None:
    """ValueError unless ``value`` is a finite number in [low, high] (``(low, high]`` with ``low_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if low_open else value >= low) and value <= high
    if not ok:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{option} must be a finite number in {span}, got {value!r}")


MAX_SAMPLES = 10_000            # images one sample/interpolate command draws
MAX_SCALE = 32                  # integer upscaling of a written grid
MAX_GRID_PIXELS = 100_000_000   # pixels of a written grid (100 MP: ~300 MB as RGB bytes, a few GB while drawn)
MAX_SEED = 2**63 - 1


def check_int(value, option: str, low: int, high: int) -> int:
    """``value`` if it is an int in [low, high] (not a bool), else ValueError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{option} must be an int in {low:,}..{high:,}, got {value!r}")
    return value


def check_seed(seed, option: str = "--seed") -> int:
    """A seed torch accepts: an int in 0..2**63-1."""
    return check_int(seed, option, 0, MAX_SEED)


def check_grid(count: int, nrow: int, size: int, scale: int, option: str = "-n") -> None:
    """Bounds of an image grid before anything is drawn: ``count`` images of ``size`` pixels, ``nrow`` per
    row, upscaled ``scale`` times (ValueError naming the option to lower)."""
    check_int(scale, "--scale", 1, MAX_SCALE)
    check_int(count, option, 1, MAX_SAMPLES)
    rows = -(-count // max(1, nrow))
    pixels = (rows * (size + 2) * scale) * (min(count, nrow) * (size + 2) * scale)
    if pixels > MAX_GRID_PIXELS:
        raise ValueError(f"the grid would have {pixels / 1e6:,.0f} megapixels ({count} images of {size}x{size} "
                         f"at --scale {scale}); at most {MAX_GRID_PIXELS / 1e6:,.0f} are written: lower "
                         f"{option} or --scale")


def open_memory(memory: str):
    """The :class:`gmem.GANMemory` in directory ``memory``; FileNotFoundError saying how to create one if
    there is none, ValueError if ``memory`` is a file."""
    from ..memory import GANMemory
    from ..store import ManifestError

    require_manifest(memory)
    try:
        return GANMemory.load(memory)
    except ManifestError as e:
        raise ManifestError(repair_hint(str(e), memory)) from None


def require_manifest(memory) -> None:
    """ValueError if ``memory`` is a file; FileNotFoundError saying what to do if it has no manifest (create a
    memory, or rebuild the manifest from task files that are there: never a command that deletes them)."""
    from ..store import MANIFEST

    if Path(memory).exists() and not Path(memory).is_dir():
        raise ValueError(f"{memory} is a file, not a memory directory")
    if not (Path(memory) / MANIFEST).is_file() and not (Path(memory) / MANIFEST).is_symlink():
        if has_task_files(memory):
            raise FileNotFoundError(f"{memory}: {MANIFEST} is missing but task files are there; rebuild it "
                                    f"from them with `gmem verify {memory} --repair`")
        raise FileNotFoundError(f"no GAN memory at {memory!r} ({MANIFEST} not found); create one with "
                                f"`gmem learn {memory} NAME DATA`")


def has_task_files(memory) -> bool:
    """Whether ``memory`` holds task files (``tasks/*.safetensors``), with or without a manifest."""
    tasks = Path(memory) / "tasks"
    return tasks.is_dir() and not tasks.is_symlink() and any(tasks.glob("*.safetensors"))


def repair_hint(message: str, memory) -> str:
    """``message`` about a damaged manifest, plus how to rebuild it from the task files (which keeps them)."""
    if "damaged manifest" in message and has_task_files(memory):
        return f"{message}; rebuild it from the task files with `gmem verify {memory} --repair`"
    return message


def check_device(name: str):
    """``torch.device(name)`` if it exists on this machine, else ValueError saying what is missing."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device {name!r} is not a device name ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {name}: MPS is not available here (use --device cpu)")
    elif dev.type != "cpu":
        raise ValueError(f"--device {name}: unsupported device type {dev.type!r} (cpu, cuda or mps)")
    return dev


def check_writable_directory(directory) -> Path:
    """Create ``directory`` if needed and prove it writable by creating and deleting a probe file."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file, not a memory directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".gmem-probe-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.close(fd)
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to the memory directory {directory}: {e.strerror or e}") from None
    return directory


def _available_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_batch_size(mem, batch_size: int, device) -> None:
    """ValueError if ``batch_size`` is not positive or its training activations would not fit in memory.

    The estimate: one forward of the base generator and discriminator at batch 1 (every module's
    output counted), times :data:`ACTIVATION_COPIES`, times the batch size.
    """
    import torch

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"--batch-size must be an int in 1..{MAX_BATCH_SIZE:,}, got {batch_size!r}")
    total = [0]

    def count(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * output.element_size()

    hooks = [m.register_forward_hook(count) for net in (mem.generator, mem.discriminator) for m in net.modules()]
    try:
        with torch.no_grad():
            x = mem.sample("source", 1, seed=0)
            mem.discriminator(x.to(next(mem.discriminator.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    need = total[0] * ACTIVATION_COPIES * batch_size
    have = _available_bytes(device)
    if need > have:
        raise ValueError(f"--batch-size {batch_size} needs about {need / 2**30:.1f} GiB for activations on {device}, "
                         f"only {have / 2**30:.1f} GiB are available; use a smaller batch size")


def image_format(out) -> str:
    """The Pillow format that ``out``'s suffix names (``.png`` -> PNG, ``.jpg`` -> JPEG, ...); ValueError if none."""
    from PIL import Image

    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a directory; give an image file name such as {path / 'samples.png'}")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"--out {out}: unknown image file suffix {path.suffix!r} (use .png, .jpg, .webp, .bmp "
                         "or .tif)")
    return fmt


def write_grid(images, out, *, nrow: int, scale: int, row_labels=None) -> None:
    """Write images ``[N, C, H, W]`` in [-1, 1] as one grid in the format ``out``'s suffix names, atomically
    (``row_labels``: a text per row, e.g. its task)."""
    from ..images import save_grid

    fmt = image_format(out)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, out, nrow=nrow, scale=scale, format=fmt, row_labels=row_labels)
