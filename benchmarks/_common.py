"""Shared helpers for the diffmic benchmarks (not part of the package).

* puts ``<repo>/src`` first on ``sys.path`` so every script runs from a fresh clone with one command;
* device selection (``auto`` = CUDA when available, else CPU) — never a hard-coded device index;
* wall-clock timing with device synchronisation;
* peak-memory measurement per phase:
    - CUDA: ``torch.cuda.reset_peak_memory_stats`` / ``torch.cuda.max_memory_allocated``;
    - CPU (Linux): the process peak RSS (``VmHWM``) reset per phase via ``/proc/self/clear_refs`` ("5"),
      reported as the peak and as the increase over the RSS at the start of the phase. Where the reset is not
      permitted the fallback is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (process-wide, not per phase; the
      JSON says so). ``tracemalloc`` is *not* used: it only sees Python's allocator, not tensor storage;
* machine information for the JSON report;
* ``emit(obj)`` prints the result as ONE JSON line (the last line on stdout).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_SRC = ROOT / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import torch  # noqa: E402

__all__ = [
    "ROOT",
    "PeakMemory",
    "Phase",
    "emit",
    "log",
    "machine_info",
    "pick_device",
    "set_threads",
    "sync",
    "timed",
    "best_of",
    "cpu_busy_s",
    "own_cpu_s",
    "wait_for_quiet",
]


def set_threads(n: int | None = None) -> int:
    """Use all cores for intra-op parallelism (``torch.set_num_threads(os.cpu_count())``)."""
    n = int(n or os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → the current CUDA device when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return dev


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[Any, float]:
    """Run ``fn()`` and return ``(result, seconds)`` with device syncs around it."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def _trim_heap() -> None:
    gc.collect()
    try:  # glibc: return freed arenas to the OS so the next phase starts from a lower RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring the peak memory of one phase (see module docstring).

    After exit, ``.report()`` is a dict with ``method``, ``peak_mib`` and ``delta_mib`` (peak minus the
    memory in use when the phase started: activations, gradients, optimiser state, …).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.start_b = 0
        self.peak_b = 0

    def __enter__(self) -> PeakMemory:
        _trim_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_b = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        elif _reset_hwm() and _status_kb("VmRSS") is not None:
            self.start_b = 1024 * (_status_kb("VmRSS") or 0)
            self.method = "peak RSS (VmHWM) reset per phase via /proc/self/clear_refs"
        else:
            self.start_b = 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "resource.getrusage ru_maxrss (process-wide peak, NOT reset per phase)"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_b = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("peak RSS"):
            self.peak_b = 1024 * (_status_kb("VmHWM") or 0)
        else:
            self.peak_b = 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def report(self) -> dict[str, Any]:
        mib = 1024.0 * 1024.0
        return {
            "method": self.method,
            "peak_mib": round(self.peak_b / mib, 1),
            "delta_mib": round(max(0, self.peak_b - self.start_b) / mib, 1),
        }


def cpu_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine so far (all processes, incl. steal), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(a) for a in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v[:8]) - idle) / hz


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class ForeignLoad:
    """The share of the machine's CPU that other programs used between ``start()`` and ``share()``
    (busy CPU seconds of the whole machine minus this process's, over wall time × logical CPUs; None
    where /proc/stat cannot be read)."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self._busy, self._own, self._t0 = cpu_busy_s(), own_cpu_s(), time.perf_counter()

    def share(self) -> float | None:
        busy, own, elapsed = cpu_busy_s(), own_cpu_s(), time.perf_counter() - self._t0
        if busy is None or self._busy is None or elapsed <= 0:
            return None
        return round(max(0.0, (busy - self._busy) - (own - self._own)) / (elapsed * (os.cpu_count() or 1)), 3)

    def record(self, device: torch.device) -> dict[str, Any]:
        """The closing keys of a benchmark's JSON: ``foreign_cpu_share`` since ``start()``,
        ``contended`` (above 0.1) and ``machine``."""
        foreign = self.share()
        return {
            "foreign_cpu_share": foreign,
            "contended": foreign is not None and foreign > 0.1,
            "machine": machine_info(device),
        }


class Phase:
    """Times one phase (with device syncs) and measures its peak memory and the CPU load *not* caused by
    this process (other programs, hypervisor steal) while it ran.

    ``foreign_cpu_share`` = (machine busy CPU-s − this process's CPU-s) / (wall-s × cpu_count); on a quiet
    machine it is ≈ 0. Other work on the same cores slows multi-threaded PyTorch a lot (threads wait at
    barriers for a descheduled sibling), so a phase with a share above ~0.1 should be treated as unreliable.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mem = PeakMemory(device)
        self.seconds = 0.0
        self.foreign_cpu_share: float | None = None

    def __enter__(self) -> Phase:
        self.mem.__enter__()
        sync(self.device)
        self._busy0, self._own0 = cpu_busy_s(), own_cpu_s()
        self._t0 = self.t_start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.t_end = time.perf_counter()
        self.seconds = self.t_end - self._t0
        busy1, own1 = cpu_busy_s(), own_cpu_s()
        self.mem.__exit__(*exc)
        if self._busy0 is not None and busy1 is not None and self.seconds > 0:
            foreign = (busy1 - self._busy0) - (own1 - self._own0)
            self.foreign_cpu_share = round(max(0.0, foreign) / (self.seconds * (os.cpu_count() or 1)), 3)

    def report(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "memory": self.mem.report(),
            "foreign_cpu_share": self.foreign_cpu_share,
        }


def wait_for_quiet(max_wait_s: float, threshold: float = 0.1, window_s: float = 1.0) -> dict[str, Any]:
    """Wait (at most ``max_wait_s``) until the CPU load from other programs, measured over ``window_s``
    windows, is below ``threshold`` of the machine. Returns ``{"waited_s", "foreign_cpu_share"}``."""
    t0 = time.perf_counter()
    share = None
    while True:
        b0, o0, w0 = cpu_busy_s(), own_cpu_s(), time.perf_counter()
        time.sleep(window_s)
        b1, o1, w1 = cpu_busy_s(), own_cpu_s(), time.perf_counter()
        if b0 is None or b1 is None:
            break
        share = max(0.0, (b1 - b0) - (o1 - o0)) / ((w1 - w0) * (os.cpu_count() or 1))
        if share < threshold or time.perf_counter() - t0 >= max_wait_s:
            break
    return {
        "waited_s": round(time.perf_counter() - t0, 1),
        "foreign_cpu_share": None if share is None else round(share, 3),
    }


def best_of(fn, device: torch.device, repeats: int = 3) -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` runs (robust to transient load)."""
    return min(timed(fn, device)[1] for _ in range(max(1, repeats)))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """Facts that the timings depend on."""
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["cuda_version"] = torch.version.cuda
    return info


def _float(out):
    """A network output (a tensor or a named tuple of them) with its bf16 tensors back in fp32."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.dtype == torch.bfloat16 else out
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(_float(v) for v in out))
    return out


def bf16_networks(model) -> None:
    """Run ``model``'s DCG and ρ(x) passes (``guide``, ``encode``) under CPU bf16 autocast (oneDNN),
    returning fp32 outputs: the denoiser and everything after stay in fp32."""
    for name in ("guide", "encode"):
        fn = getattr(model, name)

        def wrapped(*a, _fn=fn, **k):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _float(_fn(*a, **k))

        setattr(model, name, wrapped)


def emit(obj: dict[str, Any]) -> None:
    """Print the result as one JSON line (must be the last line on stdout)."""
    sys.stdout.flush()
    print(json.dumps(obj, sort_keys=False, default=str), flush=True)


def log(*args: Any) -> None:
    """Progress messages go to stderr so the last stdout line stays the JSON result."""
    print(*args, file=sys.stderr, flush=True)
