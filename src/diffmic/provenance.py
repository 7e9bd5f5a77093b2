"""Where and how a result was measured: the machine, the software and the time it took.

Every run's ``fit_summary.json`` and ``test_metrics.json`` carry a :func:`machine` record and the wall /
CPU time of the command, so that a number quoted in the docs can be traced to a committed record that
says on what it ran and how busy the machine was (``load_average``: the 1-minute load of the machine
at the start and end, which counts other processes too; ``cpu_utilisation``: this process's CPU time
per wall second per thread it was allowed, 1.0 for a process that had its cores to itself).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["machine", "Stopwatch"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine and software a measurement ran on (no user or host names)."""
    import torch

    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "system": f"{platform.system()} {platform.machine()}",
    }


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on every platform
        return None


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class Stopwatch:
    """Wall and CPU time of one command, with the machine's load at its start and end."""

    started: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    _t0: float = field(default_factory=time.perf_counter)
    _c0: float = field(default_factory=_cpu_seconds)
    _load0: float | None = field(default_factory=_load)

    def record(self) -> dict:
        """``{"started", "wall_time_s", "cpu_time_s", "cpu_utilisation", "load_average", "machine"}``."""
        wall = time.perf_counter() - self._t0
        cpu = _cpu_seconds() - self._c0
        m = machine()
        threads = max(1, int(m["torch_threads"] or 1))
        return {
            "started": self.started,
            "wall_time_s": round(wall, 1),
            "cpu_time_s": round(cpu, 1),
            "cpu_utilisation": round(cpu / wall / threads, 3) if wall > 0 else None,
            "load_average": {"start": self._load0, "end": _load()},
            "machine": m,
        }
