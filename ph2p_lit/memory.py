"""Peak memory of the work on one batch of images: the device's allocator on a GPU, the process's
peak resident set on the CPU (Linux's VmHWM, which /proc/self/clear_refs can reset)."""

from pathlib import Path

import torch


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS to the current RSS
    except OSError:
        pass  # not Linux, or not allowed: the peak is then the process's since it started


def peak_mb(device: torch.device) -> float | None:
    """Peak since the last reset_peak, in MiB (None where the platform does not say)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return int(line.split()[1]) / 1024 if line else None
