"""Machine facts recorded with every benchmark: hardware, versions, load, measured matmul peak,
and a peak-memory probe that works on CPU (where torch keeps no allocator statistics)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterator

import torch

import subquad


def cpu_model() -> str:
    """The CPU's name with its family and model numbers: VMs may report only "AMD EPYC" for every
    generation, and two 2-core VMs named so differed by 1.7x in float32 matmul peak (119-142 against
    225-230 GFLOP/s), so the numbers tell runs on them apart."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, sep, value = line.partition(":")
            if not sep:
                if fields:
                    break  # the first processor's block is enough
                continue
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine()
    ids = [f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields]
    return f"{name} ({', '.join(ids)})" if ids else name


@functools.cache
def git_commit() -> str | None:
    """The checkout's HEAD, read once per process (at the first call, a run's start), so every part
    of a long run (``bench all``) names the same commit even if HEAD moves while it runs."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


#: The allocator setting bench commands typed in a shell run with (see ``subquad.cli``): glibc's
#: malloc takes every buffer from its heap (``mmap_max=0``) and keeps freed heap (``trim_threshold``
#: 1 TiB), so a buffer freed by one call is reused by the next, as a caching allocator does. By
#: default glibc maps each buffer over its threshold (at most 32 MB) afresh and unmaps it when freed,
#: so every call on long inputs pays first-touch page faults on its large outputs again: filling a new
#: 134 MB tensor took 29 ms that way against 5 ms in reused heap on the 2-core VM of docs/.
ALLOCATOR_ENV = "SUBQUAD_BENCH_ALLOCATOR"
BENCH_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


def allocator_info() -> dict:
    """How this process's allocator is set: the C library, ``GLIBC_TUNABLES``, the bench setting
    (``keep``: rerun with ``BENCH_TUNABLES``; ``system``: left as it is), and PyTorch's huge-page
    switch ``THP_MEM_ALLOC_ENABLE`` with the kernel's mode."""
    mode = None
    with contextlib.suppress(OSError), open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        found = re.search(r"\[(\w+)\]", f.read())
        mode = found.group(1) if found else None
    return {
        "libc": " ".join(platform.libc_ver()).strip() or None,
        "bench_allocator": os.environ.get(ALLOCATOR_ENV),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "thp_kernel": mode,
    }


def allocator_label(info: dict) -> str:
    """``machine_info``'s allocator setting in words, for report lines (older runs lack it)."""
    a = info.get("allocator")
    if not a:
        return "allocator not recorded"
    keeps = BENCH_TUNABLES in (a.get("glibc_tunables") or "")
    text = "freed buffers kept for reuse (GLIBC_TUNABLES)" if keeps else "system allocator defaults"
    return f"allocator: {text}"


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "subquad": subquad.__version__,
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "device": str(device),
        "allocator": allocator_info(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 7) -> float:
    """GFLOP/s of the fastest of ``repeats`` ``n x n`` matmuls in ``dtype``: the denominator of
    'fraction of peak'. The fastest, not the median: on a shared VM a slow spell during the few
    repeats made a median peak fall to 102 GFLOP/s in a run whose other measurements reached 185,
    and SDPA then showed 139% of it."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 2):
        synchronize(device)
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        synchronize(device)
        if i >= 2:  # two warmups
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def matmul_peak_record(start: float, end: float, dtype_name: str) -> dict:
    """A run's matmul peak for its machine record: the larger of the ``matmul_peak_gflops``
    measured at its start and its end (a slow spell at either cannot lower it), with how."""
    return {
        "matmul_peak_gflops": round(max(start, end), 2),
        "matmul_peak_note": f"fastest of 7 2048x2048 {dtype_name} matmuls, measured at the start "
        f"({start:.1f}) and the end ({end:.1f}) of the run; the larger",
    }


class PeakMemory:
    """Peak memory of a call above what was held just before it.

    CPU: the process's resident-set high-water mark (``VmHWM``), reset by writing ``5`` to
    ``/proc/self/clear_refs`` after ``malloc_trim(0)`` hands freed heap back to the OS; so it
    counts every byte the call touched, torch's or not. CUDA: the caching allocator's peak.
    ``available`` is False (and ``reason`` says why) where neither works.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.available = True
        self.reason = ""
        self._libc = None
        if device.type == "cuda":
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._read("VmHWM")
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError as err:
            self.available = False
            self.reason = f"no /proc peak-RSS reset on this system ({err})"

    @staticmethod
    def _read(field: str) -> int:
        with open("/proc/self/status") as f:
            match = re.search(rf"{field}:\s+(\d+) kB", f.read())
        if match is None:
            raise OSError(f"{field} missing from /proc/self/status")
        return int(match.group(1)) * 1024

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict]:
        """``with probe.measure() as m: ...``; afterwards ``m["bytes"]`` holds the peak (or None)."""
        result: dict = {"bytes": None}
        if not self.available:
            yield result
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield result
            torch.cuda.synchronize(self.device)
            result["bytes"] = torch.cuda.max_memory_allocated(self.device) - base
            return
        self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = self._read("VmRSS")
        yield result
        result["bytes"] = max(0, self._read("VmHWM") - base)


def measure_peak(fn: Callable[[], object], probe: PeakMemory) -> int | None:
    with probe.measure() as m:
        out = fn()
        del out
    return m["bytes"]


def results_dir(name: str) -> str:
    """``results/<name>-<UTC time>``: where a benchmark writes when no ``--out`` is given."""
    from datetime import datetime, timezone

    return os.path.join("results", f"{name}-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))
