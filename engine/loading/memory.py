"""What loading cost in host memory: the bytes each model holds once loaded, and the process's resident
memory before the load and at its peak, for the log and the /v1/models card.

Why: the peak at load decides the machine a server needs, and a load that converts dtypes, packs
layers or quantizes them may briefly hold a model twice. "Held" counts every copy a model keeps on
purpose (a quantized layer's int8 weight and its dequantized copy for wide inputs, an fp32 copy for
prefill), each shared tensor once.
"""

from __future__ import annotations

import ctypes
import resource
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import torch
from torch import nn

GIB = 1 << 30
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
LOAD_MMAP_THRESHOLD = 1 << 20  # while loading: every weight-sized block its own mapping
# After: where glibc's adaptive thresholds end on 64-bit (mmap 32 MiB, trim twice that). Setting one by hand
# turns the adaptation off, and a trim threshold left at its 128 KiB default would hand back and fault in
# again the activations' memory at every forward.
SERVE_MMAP_THRESHOLD = 32 << 20
SERVE_TRIM_THRESHOLD = 2 * SERVE_MMAP_THRESHOLD


def held_bytes(model: nn.Module, device_type: str | None = None) -> int:
    """Bytes of the parameters and buffers of `model` (only those on `device_type` if given), each
    storage once: tied weights share one."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if device_type is not None and tensor.device.type != device_type:
            continue
        key, size = _storage(tensor)
        if key not in seen:
            seen.add(key)
            total += size
    return total


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextmanager
def layer_by_layer_memory() -> Iterator[None]:
    """A load that replaces layers one by one (converting, packing, quantizing) should peak at the model
    plus one layer. glibc defeats that: after the first large free it serves blocks of up to 32 MiB from
    its heap, where a freed original leaves a hole the next, differently sized, copy does not fit, so the
    heap grows by about the model again and keeps it after the load. Inside this block every block of
    1 MiB or more is its own mapping, returned to the system when freed; on leaving, the threshold goes to
    where glibc's adaptive one ends and the heap's free memory is returned. Elsewhere than glibc: nothing."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)
            libc.mallopt(M_MMAP_THRESHOLD, SERVE_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, SERVE_TRIM_THRESHOLD)


def _storage(tensor: torch.Tensor) -> tuple[int, int]:
    """A key shared by the tensors of one storage, and that storage's bytes. A tensor-parallel shard counts
    its local part; oneDNN's packed layout (opaque) and other storage-less tensors count their elements."""
    if hasattr(tensor, "to_local"):  # a DTensor: this rank holds its local shard
        tensor = tensor.to_local()
    if not tensor.is_mkldnn:
        try:
            storage = tensor.untyped_storage()
            return storage.data_ptr(), storage.nbytes()
        except RuntimeError:  # a wrapper without a storage of its own
            pass
    return id(tensor), tensor.numel() * tensor.element_size()


def rss_bytes() -> int:
    """The process's resident memory now."""
    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Start a new peak (Linux's clear_refs "5" resets VmHWM); False where the kernel does not allow it,
    and the peak is then the process's lifetime one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's highest resident memory since the last `reset_peak_rss` (VmHWM), else since it started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kilobytes


def load_memory(models: dict[str, nn.Module | None], rss_before: int) -> dict:
    """The memory record of a load that started with `rss_before` bytes resident (and `reset_peak_rss`):
    bytes held per model in host memory (a GPU's memory is the placement planner's), the process's RSS
    before, now and at its peak, and the peak's rise over `rss_before` in units of the held bytes (1.0: no
    transient copy)."""
    held = {name: held_bytes(model, "cpu") for name, model in models.items() if model is not None}
    total = sum(held.values())
    peak = peak_rss_bytes()
    return {
        "held_cpu_bytes": held,
        "rss_before_load_bytes": rss_before,
        "rss_bytes": rss_bytes(),
        "peak_rss_bytes": peak,
        "peak_rise_over_held": round((peak - rss_before) / total, 3) if total else None,
    }


def describe(record: dict) -> str:
    """One log line of a `load_memory` record."""
    held = ", ".join(f"{name} {size / GIB:.2f} GiB" for name, size in record["held_cpu_bytes"].items())
    rise = record["peak_rise_over_held"]
    return (f"host memory: held {held}; RSS {record['rss_before_load_bytes'] / GIB:.2f} GiB before the load, "
            f"{record['rss_bytes'] / GIB:.2f} GiB after, peak {record['peak_rss_bytes'] / GIB:.2f} GiB"
            + (f" (a rise of {rise:.2f}x the held bytes)" if rise is not None else ""))
