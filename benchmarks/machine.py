"""What a number was measured on: machine, versions, thread count, TF32 setting."""
from __future__ import annotations

import os
import platform
import re

import torch


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform), e.g. ``"AMD EPYC"``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def machine_name(device: str) -> str:
    """GPU name on cuda, CPU model on cpu."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return cpu_model()


def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001 - a missing or broken triton is just "none"
        return None


def environment(device: str, threads: int) -> dict:
    """Fields shared by every record of a run."""
    env = {
        "device": device,
        "machine": machine_name(device),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "threads": threads,
        "logical_cpus": os.cpu_count(),
    }
    if device == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_count"] = torch.cuda.device_count()
    return env


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def results_filename(device: str, threads: int) -> str:
    """``cpu-<model>-<n>threads.json`` or ``cuda-<gpu>.json``: one results file per machine."""
    if device == "cuda":
        return f"cuda-{slug(machine_name(device))}.json"
    return f"cpu-{slug(cpu_model())}-{threads}threads.json"


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 in fp32 matmuls and convolutions (cuBLAS and cuDNN)."""
    import warnings

    with warnings.catch_warnings():  # newer torch prefers fp32_precision; the flags still work
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
