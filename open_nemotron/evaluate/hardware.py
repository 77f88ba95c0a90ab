"""What the machine can do: memory bandwidth and matmul rate, the yardsticks for decode and training speed."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, repeats: int, device: torch.device) -> float:
    """Fastest of `repeats` timed runs: a capability measurement (as STREAM reports), robust to a busy machine."""
    fn()  # warm-up: first touch of pages, kernel selection
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


@dataclass
class MemoryBandwidth:
    """Bytes per second. `copy`: buffer bytes copied per second (each byte is read once and written once: the
    convention of the issue's "~9.5 GB/s" figure); `read`: bytes summed per second (read-only streaming)."""

    copy_bytes_per_s: float
    read_bytes_per_s: float
    buffer_bytes: int


def measure_memory_bandwidth(
    device: torch.device | None = None, buffer_mib: int = 512, repeats: int = 5
) -> MemoryBandwidth:
    """Best copy and read bandwidth over a buffer far larger than any cache."""
    device = device or torch.device("cpu")
    n = buffer_mib * 1024 * 1024 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_s = _best_seconds(lambda: dst.copy_(src), repeats, device)
    read_s = _best_seconds(lambda: src.sum(), repeats, device)
    nbytes = n * 4
    return MemoryBandwidth(nbytes / copy_s, nbytes / read_s, nbytes)


def measure_matmul_flops(
    device: torch.device | None = None, dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5
) -> float:
    """Best FLOP/s of a square matmul: the compute ceiling training is compared against."""
    device = device or torch.device("cpu")
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = _best_seconds(lambda: a @ b, repeats, device)
    return 2 * size**3 / seconds


def describe_device(device: torch.device) -> dict:
    """A short description of where numbers were measured (stored with every benchmark result)."""
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = _cpu_model()
        info["cpu_count"] = os.cpu_count()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


__all__ = [
    "MemoryBandwidth",
    "asdict",
    "describe_device",
    "measure_matmul_flops",
    "measure_memory_bandwidth",
    "synchronize",
]
