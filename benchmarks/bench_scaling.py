"""How cost grows (goal 6 of issue 14): time and peak memory of inference and training against image size,
number of classes C, samples per image K, batch size B and data-set size N, one factor at a time.

Base point = the default model preset: 224 px, ResNet-18 image encoder rho(x), ResNet-18 DCG global and
local streams (6 ROIs of 32 px), denoiser width 6144, C = 7, T = 1000, batch 16; random-init weights, CPU.

Sweeps (one factor varied, the others at the base):
    size    {64, 96, 128, 160, 224} px       infer + train
    classes {2, 7, 20, 100}                  infer + train
    K       {1, 2, 4, 8, 16}                 infer only (K does not exist in training)
    batch   {1, 2, 4, 16, 32, 64}            infer + train (training needs B >= 2: BatchNorm in rho's
                                             projection; B = 1 is skipped with that reason)
    dataset the decoded-image cache (diffmic.data.cache: uint8 N x S x S x 3 .npy, memory-mapped):
            bytes on disk for HAM10000 (N = 10,015) at every size of the size sweep = N * S^2 * 3
            (computed), plus the RSS of memory-mapping and reading every row of a synthetic cache of
            --dataset-n images at 224 px written to a temporary folder (measured, then SCALED linearly
            to N = 10,015; the JSON says so), and of copying it into RAM. The file is deleted afterwards.

Each (point, infer|train) runs in its own fresh subprocess (this script with --one JSON), so its peak RSS
is its own. Inference = ``reverse_sample`` with the goal-1 sampler (``bench_inference.FEWSTEP``: DDIM,
5 network calls, from the prior mean at t_start = 249 of the truncated 250-step window, here with the
point's K); the DCG / encoder / denoiser-head calls are timed inside the same runs (a proxy of the model,
no extra passes). The released 250-step truncated chain is too slow to sweep: its cost per batch is
composed as DCG + encoder + 250 * head_call_s (head_call_s = one denoiser call on the point's K*B rows)
and reported as ``released_chain_composed_s_per_image`` (composed, not timed). Training = the library's
step with the default settings (``diffmic.training.step.PlainStep``, as ``bench_train.py`` OURS: DCG priors
without grad, one encoder pass, three denoiser branches, fused Adam + clip, DCG CE step).

Timing: one warm-up call on the full batch (for training it also creates the Adam state), then the median
of --repeats timed calls (--max-images N caps the timed calls of a point at ceil(N / B), to shorten runs
with large batches; off by default). Memory: the peak RSS of the timed calls (VmHWM reset per call) and its
increase over the RSS when the call started (activations, gradients); the peak includes ~0.9 GiB that
importing torch + timm alone maps on this machine. Every timed call records the CPU share used by other
programs (``_common.Phase``); a point whose median share is above 0.1 is marked contended. With 2 threads on
2 shared cores, contention slows PyTorch several-fold (threads wait at barriers): re-run those points.

The dominant term per factor is computed from the measurements: a least-squares power-law exponent
p (time per image ~ value^p, and the same for peak RSS) and, for inference, the component (DCG, encoder,
denoiser head, other) that accounts for most of the change in time per image between the smallest and
the largest value, with each component's share at the largest value.

Outputs: --out-json (default benchmarks/results/scaling-latest.json), --out-md (default
benchmarks/results/scaling-latest.md), --out-fig (default docs/figures/cost_scaling.png; with --quick all
three default to benchmarks/results/scaling-quick-latest.*). Folders are created. Overwrite rule: a file
whose name contains "-latest" is meant to be replaced and always is; any other existing output file is
only replaced with --force (checked before anything is measured). The last stdout line is one JSON object.

Usage:
    python benchmarks/bench_scaling.py                      # full run (~5-7 min on 2 idle cores, estimated)
    python benchmarks/bench_scaling.py --quick              # smoke run: 32-64 px, width 64, batch 2 (< 1 min)
    python benchmarks/bench_scaling.py --factors size,batch --repeats 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import ROOT, Phase, emit, log, machine_info, set_threads, wait_for_quiet  # noqa: E402

FACTORS = ("size", "classes", "K", "batch", "dataset")
HAM10000_N = 10_015
BASE = {"size": 224, "classes": 7, "K": 1, "batch": 16, "width": 6144, "T": 1000, "window": 250}
SWEEP = {
    "size": [64, 96, 128, 160, 224],
    "classes": [2, 7, 20, 100],
    "K": [1, 2, 4, 8, 16],
    "batch": [1, 2, 4, 16, 32, 64],
}
QUICK_BASE = {"size": 64, "classes": 7, "K": 1, "batch": 2, "width": 64, "T": 1000, "window": 250}
QUICK_SWEEP = {"size": [32, 64], "classes": [2, 7], "K": [1, 2], "batch": [2, 4]}
TRAIN_MIN_BATCH = 2  # BatchNorm in training mode needs more than one sample
FLAT = 0.1  # |p| below this: the factor does not change the cost
TRAIN_FACTORS = ("size", "classes", "batch")  # no K in training
LABEL = {"size": "image size S (px)", "classes": "classes C", "K": "samples per image K", "batch": "batch B"}
CONTENDED = 0.1
COMPONENTS = ("dcg", "encoder", "head", "other")


# ----------------------------------------------------------------------------------------------- helpers
def cache_bytes(n: int, size: int, channels: int = 3) -> int:
    """Bytes of the decoded-image cache (``diffmic.data.cache``): uint8 ``[N, S, S, C]`` (+ a small .npy header)."""
    return int(n) * int(size) * int(size) * int(channels)


def power_fit(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares exponent p of ``y = a * x^p`` (slope of log y on log x); None with < 2 usable points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def timed_calls(repeats: int, max_images: int, batch: int) -> int:
    """Timed calls for a point: at most ``repeats``, and at most ceil(max_images / batch) (>= 1)."""
    if max_images <= 0:
        return max(1, repeats)
    return max(1, min(repeats, math.ceil(max_images / batch)))


def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        return None
    return None


def _process_peak_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # Linux: KiB


def _med(xs: Sequence[float | None]) -> float | None:
    """The median of the values that are not None (None when there is none)."""
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def _phase_summary(phases: list[Phase]) -> dict[str, Any]:
    mems = [p.mem.report() for p in phases]
    shares = [p.foreign_cpu_share for p in phases if p.foreign_cpu_share is not None]
    return {
        "runs_s": [round(p.seconds, 4) for p in phases],
        "peak_rss_mib": max(m["peak_mib"] for m in mems),
        "delta_rss_mib": max(m["delta_mib"] for m in mems),
        "memory_method": mems[0]["method"],
        "foreign_cpu_share": shares,
        "foreign_cpu_share_median": _r(_med(shares), 3),
        "contended": bool(shares and statistics.median(shares) > CONTENDED),
    }


# ------------------------------------------------------------------------------------------ child: infer
class CallClock:
    """Transparent proxy of the model that times its ``guide`` (DCG), ``encode`` (rho) and ``eps`` (denoiser
    head) calls; ``reverse_sample`` runs unchanged through it."""

    def __init__(self, model) -> None:
        self._model = model
        self.reset()

    def reset(self) -> None:
        self.t: dict[str, list[float]] = {"dcg": [], "encoder": [], "head": []}

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _timed(self, key, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        self.t[key].append(time.perf_counter() - t0)
        return out

    def guide(self, *a, **kw):
        return self._timed("dcg", self._model.guide, *a, **kw)

    def encode(self, *a, **kw):
        return self._timed("encoder", self._model.encode, *a, **kw)

    def eps(self, *a, **kw):
        return self._timed("head", self._model.eps, *a, **kw)


def child_infer(cfg: dict, n_timed: int, seed: int) -> dict[str, Any]:
    from bench_inference import FEWSTEP
    from diffmic.diffusion.reverse import reverse_sample
    from diffmic.diffusion.schedule import NoiseSchedule
    from diffmic.nn.diffmic import DiffMIC

    dev = torch.device("cpu")
    B, S, C, K = cfg["batch"], cfg["size"], cfg["classes"], cfg["K"]
    torch.manual_seed(seed)
    model = DiffMIC(C, hidden_dim=cfg["width"], num_timesteps=cfg["T"]).eval()
    schedule = NoiseSchedule.build(num_timesteps=cfg["T"])
    x = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(seed + 1))
    few = {**FEWSTEP, "start": "mean", "t_start": cfg["window"] - 1, "num_samples": K}
    clock = CallClock(model)
    reverse_sample(clock, schedule, x, **few)  # warm-up
    runs: list[dict[str, float]] = []
    phases: list[Phase] = []
    for _ in range(n_timed):
        clock.reset()
        with Phase(dev) as ph:
            reverse_sample(clock, schedule, x, **few)
        t = clock.t
        comp = {"dcg": sum(t["dcg"]), "encoder": sum(t["encoder"]), "head": sum(t["head"])}
        comp["other"] = max(0.0, ph.seconds - sum(comp.values()))
        head_call = statistics.median(t["head"])  # every run calls the denoiser head
        runs.append({"total": ph.seconds, **comp, "head_call": head_call, "head_calls": len(t["head"])})
        phases.append(ph)
    med = {k: statistics.median([r[k] for r in runs]) for k in ("total", *COMPONENTS, "head_call")}
    released = med["dcg"] + med["encoder"] + cfg["window"] * med["head_call"]
    return {
        "s_per_image": _r(med["total"] / B, 5),
        "s_per_batch": _r(med["total"], 4),
        "components_s_per_image": {k: _r(med[k] / B, 5) for k in COMPONENTS},
        "head_call_s": _r(med["head_call"], 5),
        "head_call_rows": B * K,
        "head_calls_per_run": runs[0]["head_calls"],
        "released_chain_composed_s_per_image": _r(released / B, 4),
        "released_chain_note": f"composed, not timed: (DCG + encoder + {cfg['window']} x head_call_s) / B",
        "sampler": {**few},
        "timed_calls": n_timed,
        **_phase_summary(phases),
        "process_peak_rss_mib": _process_peak_mib(),
    }


# ------------------------------------------------------------------------------------------ child: train
def child_train(cfg: dict, n_timed: int, seed: int) -> dict[str, Any]:
    from diffmic.config import Config
    from diffmic.diffusion.process import antithetic_timesteps
    from diffmic.diffusion.schedule import NoiseSchedule
    from diffmic.nn.diffmic import DiffMIC
    from diffmic.training.step import PlainStep

    dev = torch.device("cpu")
    B, S, C = cfg["batch"], cfg["size"], cfg["classes"]
    torch.manual_seed(seed)
    model = DiffMIC(C, hidden_dim=cfg["width"], num_timesteps=cfg["T"])
    step = PlainStep(model, Config())  # the library's step and optimisers, default settings
    schedule = NoiseSchedule.build(num_timesteps=cfg["T"])
    gen = torch.Generator().manual_seed(seed + 1)

    def batch(b: int):
        x = torch.randn(b, 3, S, S, generator=gen)
        y = torch.randint(0, C, (b,), generator=gen)
        t = antithetic_timesteps(b, schedule.num_timesteps, generator=gen)
        return {"image": x, "label": y, "id": [f"img{i}" for i in range(b)]}, (t, torch.randn(b, C, generator=gen))

    step(schedule, *batch(B))  # warm-up: Adam state, allocator
    phases: list[Phase] = []
    for _ in range(n_timed):
        data = batch(B)
        with Phase(dev) as ph:
            step(schedule, *data)
        phases.append(ph)
    step_s = statistics.median([p.seconds for p in phases])
    return {
        "s_per_image": _r(step_s / B, 5),
        "step_s": _r(step_s, 4),
        "timed_calls": n_timed,
        **_phase_summary(phases),
        "process_peak_rss_mib": _process_peak_mib(),
    }


# ---------------------------------------------------------------------------------------- child: dataset
def child_dataset(n: int, size: int, chunk: int = 64) -> dict[str, Any]:
    """Write a synthetic cache file (same layout as ``DecodedCache``), then measure mapping it, reading every
    row batch by batch (as a loader does), and copying it into RAM. Deletes the file."""
    dev = torch.device("cpu")
    shape = (n, size, size, 3)
    tmp = Path(tempfile.mkdtemp(prefix="diffmic-bench-scaling-"))
    try:
        path = tmp / f"decoded-{size}px-3ch-synthetic.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        for i in range(0, n, chunk):
            out[i : i + chunk] = i % 251
        out.flush()
        del out
        file_bytes = path.stat().st_size
        with Phase(dev) as p_map:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        with Phase(dev) as p_read:
            total = 0
            for i in range(0, n, chunk):
                total += int(np.array(arr[i : i + chunk])[:, 0, 0, 0].sum())
        rss_file, rss_anon = _status_mib("RssFile"), _status_mib("RssAnon")
        del arr
        with Phase(dev) as p_ram:
            ram = np.load(path, allow_pickle=False)  # the whole cache as an ordinary array
            ram_anon = _status_mib("RssAnon")
        del ram
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mib = 1024.0 * 1024.0
    read_delta = p_read.mem.report()["delta_mib"]
    ram_delta = p_ram.mem.report()["delta_mib"]
    scale = HAM10000_N / n
    return {
        "n": n,
        "size": size,
        "file_bytes": file_bytes,
        "file_mib": round(file_bytes / mib, 1),
        "computed_bytes": cache_bytes(n, size),
        "map": {"seconds": round(p_map.seconds, 4), "memory": p_map.mem.report()},  # too short for a CPU share
        "read_all_rows": {
            **p_read.report(),
            "s_per_image": _r(p_read.seconds / n, 6),
            "rss_file_mib_after": rss_file,
            "rss_anon_mib_after": rss_anon,
            "note": f"rows read in batches of {chunk} from the page cache (the file had just been written: a "
            "hot cache; a cold read from disk cannot be forced without root)",
        },
        "copy_to_ram": {**p_ram.report(), "rss_anon_mib": ram_anon},
        "ham10000_scaled": {
            "scaled": True,
            "scaled_from_n": n,
            "n": HAM10000_N,
            "mmap_read_rss_mib": round(read_delta * scale, 1),
            "copy_to_ram_rss_mib": round(ram_delta * scale, 1),
            "read_all_s": _r(p_read.seconds * scale, 2),
        },
        "process_peak_rss_mib": _process_peak_mib(),
    }


def run_one(spec: dict) -> dict[str, Any]:
    set_threads(spec.get("threads"))
    mode = spec["mode"]
    if mode == "infer":
        out = child_infer(spec["cfg"], spec["n_timed"], spec.get("seed", 0))
    elif mode == "train":
        out = child_train(spec["cfg"], spec["n_timed"], spec.get("seed", 0))
    elif mode == "dataset":
        out = child_dataset(spec["n"], spec["size"])
    else:
        raise SystemExit(f"--one: unknown mode {mode!r}")
    return {"mode": mode, "threads": torch.get_num_threads(), **out}


# ----------------------------------------------------------------------------------------------- parent
def spawn(spec: dict, threads: int, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": round(time.perf_counter() - t0, 1)}
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    wall = round(time.perf_counter() - t0, 1)
    if p.returncode != 0 or not lines:
        return {"error": f"subprocess exit code {p.returncode}", "wall_s": wall}
    try:
        out = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": "subprocess printed no JSON line", "wall_s": wall}
    out["wall_s"] = wall
    return out


def analyse_factor(factor: str, pts: list[dict]) -> dict[str, Any]:
    """Exponents and the dominant inference component for one swept factor (from measurements)."""
    res: dict[str, Any] = {"factor": factor}
    for mode in ("infer", "train"):
        ok = [p for p in pts if _ok(p.get(mode))]
        if len(ok) < 2:
            continue
        xs = [p["value"] for p in ok]
        res[f"{mode}_time_exponent"] = _r(power_fit(xs, [p[mode]["s_per_image"] for p in ok]), 3)
        res[f"{mode}_rss_exponent"] = _r(power_fit(xs, [p[mode]["peak_rss_mib"] for p in ok]), 3)
        res[f"{mode}_rss_delta_exponent"] = _r(power_fit(xs, [p[mode]["delta_rss_mib"] for p in ok]), 3)
    inf = sorted((p for p in pts if _ok(p.get("infer"))), key=lambda p: p["value"])
    if len(inf) >= 2:
        lo, hi = inf[0], inf[-1]
        c_lo, c_hi = lo["infer"]["components_s_per_image"], hi["infer"]["components_s_per_image"]
        change = {k: c_hi[k] - c_lo[k] for k in COMPONENTS}
        total_change = hi["infer"]["s_per_image"] - lo["infer"]["s_per_image"]
        tot_hi = sum(c_hi.values()) or 1.0
        shares_hi = {k: round(c_hi[k] / tot_hi, 3) for k in COMPONENTS}
        p_inf = res.get("infer_time_exponent")
        if p_inf is not None and abs(p_inf) < FLAT:
            dom = None  # the factor does not move the time: no term is named
        elif total_change >= 0:
            dom = max(change, key=lambda k: change[k])
        else:  # time per image falls (batch): the term that is amortised most
            dom = min(change, key=lambda k: change[k])
        res.update(
            {
                "infer_component_change_s_per_image": {k: _r(v, 5) for k, v in change.items()},
                "infer_change_s_per_image": _r(total_change, 5),
                "infer_dominant_change": dom,
                "infer_dominant_change_fraction": _r(change[dom] / total_change, 3) if dom and total_change else None,
                "infer_shares_at_max": shares_hi,
                "infer_largest_share_at_max": max(shares_hi, key=lambda k: shares_hi[k]),
                "range": [lo["value"], hi["value"]],
            }
        )
    res["statement"] = statement(factor, res)
    return res


def _ok(d: dict | None) -> bool:
    return d is not None and "s_per_image" in d


def _growth(p: float | None) -> str:
    if p is None:
        return "n/a"
    if abs(p) < FLAT:
        return f"flat (p = {p:+.2f})"
    return f"~ value^{p:.2f}"


def statement(factor: str, a: dict) -> str:
    """One sentence naming the dominant term, built only from the numbers in ``a``."""
    parts = [f"infer s/image {_growth(a.get('infer_time_exponent'))}"]
    if "train_time_exponent" in a:
        parts.append(f"train s/image {_growth(a.get('train_time_exponent'))}")
    if "infer_dominant_change" in a:
        lo, hi = a["range"]
        d = a["infer_dominant_change"]
        verb = "grows" if (a["infer_change_s_per_image"] or 0) >= 0 else "falls"
        frac = a["infer_dominant_change_fraction"]
        if d is None:
            parts.append(f"no term grows from {LABEL.get(factor, factor)} = {lo} to {hi}")
        else:
            parts.append(
                f"time/image {verb} from {LABEL.get(factor, factor)} = {lo} to {hi} mostly through the {d} term"
                + (f" ({frac:.0%} of the change)" if frac is not None else "")
            )
        largest = a["infer_largest_share_at_max"]
        parts.append(f"at {hi} the largest share is {largest} ({a['infer_shares_at_max'][largest]:.0%})")
    for mode in ("infer", "train"):
        if f"{mode}_rss_exponent" in a:
            parts.append(
                f"{mode} peak RSS {_growth(a.get(f'{mode}_rss_exponent'))}, its increase during the call "
                f"{_growth(a.get(f'{mode}_rss_delta_exponent'))}"
            )
    return "; ".join(parts)


def analyse_dataset(d: dict) -> dict[str, Any]:
    sizes = [r["size"] for r in d["ham10000_computed"]]
    gib = [r["bytes"] for r in d["ham10000_computed"]]
    res = {"factor": "dataset", "bytes_size_exponent": _r(power_fit(sizes, gib), 3), "bytes_n_exponent": 1.0}
    m = d.get("measured")
    if m and "error" not in m:
        ratio = m["read_all_rows"]["memory"]["delta_mib"] * 1024 * 1024 / m["file_bytes"]
        res["mmap_read_rss_over_file_bytes"] = round(ratio, 3)
        ram = m["ham10000_scaled"]["mmap_read_rss_mib"]
        res["statement"] = (
            f"cache bytes ~ N * S^{res['bytes_size_exponent']:.2f} (computed); reading every row of the "
            f"memory-mapped cache raised RSS by {ratio:.2f} x its file size (file-backed page cache)"
            + (", i.e. the RAM term is the file itself, N * S^2 * 3 bytes" if 0.8 <= ratio <= 1.2 else "")
            + f": {ram:.0f} MiB for HAM10000 at {m['size']} px (scaled linearly from {m['n']} images)"
        )
    else:
        res["statement"] = f"cache bytes ~ N * S^{res['bytes_size_exponent']:.2f} (computed; RSS not measured)"
    return res


# ------------------------------------------------------------------------------------------------ output
def _atomic_write(path: Path, write) -> None:
    from diffmic.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write(tmp)


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1e-3 else f"{x:.{nd}f}"
    return str(x)


def markdown(result: dict) -> str:
    st = result["setting"]
    lines = [
        f"# How cost grows — `{result['command']}`",
        "",
        f"Machine: {result['machine']['device_name']}, {result['machine']['cpu_count']} CPUs, "
        f"{st['threads']} torch threads; torch {result['machine']['torch_version']}. "
        f"Base: {st['base']}. Inference sampler: {st['sampler']}. Wall time {result['wall_s']:.0f} s."
        + (" **QUICK smoke run: numbers meaningless.**" if st["quick"] else ""),
        "",
        "s/img = median seconds per image; RSS = peak resident set of the timed calls (MiB, own subprocess; "
        "+Δ = its increase during the call); "
        "share = median CPU share used by other programs (⚠ > 0.1: contended, treat with care); "
        "head call = one denoiser call on K·B rows; 250-step = DCG + encoder + 250 head calls "
        "(composed, not timed).",
        "",
        "| factor | value | infer s/img | DCG | encoder | head (all calls) | head call s | 250-step s/img (composed) "
        "| infer RSS (+Δ) | infer share | train s/img | train RSS (+Δ) | train share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for factor, pts in result["points"].items():
        for p in pts:
            i, t = p.get("infer") or {}, p.get("train") or {}
            c = i.get("components_s_per_image") or {}

            def rss(d):
                if not _ok(d):
                    return "–"
                return f"{d['peak_rss_mib']:.0f} (+{d['delta_rss_mib']:.0f})"

            def share(d):
                if not d:
                    return "–"
                if not _ok(d):
                    return d.get("error") or d.get("skipped") or "–"
                s = d.get("foreign_cpu_share_median")
                return _fmt(s, 2) + (" ⚠" if d.get("contended") else "")

            lines.append(
                f"| {factor} | {p['value']} | {_fmt(i.get('s_per_image'), 4)} | {_fmt(c.get('dcg'), 4)} | "
                f"{_fmt(c.get('encoder'), 4)} | {_fmt(c.get('head'), 4)} | {_fmt(i.get('head_call_s'), 4)} | "
                f"{_fmt(i.get('released_chain_composed_s_per_image'), 3)} | {rss(i)} | "
                f"{share(i)} | {_fmt(t.get('s_per_image'), 4)} | {rss(t)} | {share(t)} |"
            )
    lines += ["", "## Dominant term per factor (computed from the measurements)", ""]
    lines += [
        "| factor | infer time p | train time p | infer RSS p (Δ) | train RSS p (Δ) | dominant term (infer) | statement |",
        "|---|---|---|---|---|---|---|",
    ]
    for factor, a in result["dominant"].items():
        dom = a.get("infer_dominant_change", "–" if factor == "dataset" else "n/a")
        dom = "none (flat)" if dom is None else dom
        lines.append(
            f"| {factor} | {_fmt(a.get('infer_time_exponent'), 2)} | {_fmt(a.get('train_time_exponent'), 2)} | "
            f"{_fmt(a.get('infer_rss_exponent'), 2)} ({_fmt(a.get('infer_rss_delta_exponent'), 2)}) | "
            f"{_fmt(a.get('train_rss_exponent'), 2)} ({_fmt(a.get('train_rss_delta_exponent'), 2)}) | {dom} | "
            f"{a['statement']} |"
        )
    lines.append("")
    lines.append("p = least-squares exponent of value^p (time or RSS per configuration against the factor's value).")
    ds = result.get("dataset")
    if ds:
        lines += ["", "## Data-set size: the decoded-image cache", "", "| HAM10000 (N = 10,015) | cache on disk |"]
        lines.append("|---|---|")
        for r in ds["ham10000_computed"]:
            lines.append(f"| {r['size']} px | {r['gib']:.2f} GiB ({r['bytes']:,} B, computed N·S²·3) |")
        m = ds.get("measured")
        if m and "error" not in m:
            h = m["ham10000_scaled"]
            rd = m["read_all_rows"]
            lines += [
                "",
                f"Measured on a synthetic cache of {m['n']} images at {m['size']} px ({m['file_mib']} MiB): "
                f"mapping +{m['map']['memory']['delta_mib']} MiB RSS; reading every row +{rd['memory']['delta_mib']} "
                f"MiB (RssFile {rd['rss_file_mib_after']} MiB, file-backed page cache), "
                f"{rd['s_per_image'] * 1e6:.0f} µs per image (hot page cache); copying it into RAM "
                f"+{m['copy_to_ram']['memory']['delta_mib']} MiB (anonymous). **Scaled linearly to HAM10000**: "
                f"{h['mmap_read_rss_mib']:.0f} MiB (mmap + read all) / {h['copy_to_ram_rss_mib']:.0f} MiB "
                f"(copy in RAM), {h['read_all_s']} s to read all rows.",
            ]
        elif m:
            lines += ["", f"Measured part failed: {m['error']}"]
    return "\n".join(lines) + "\n"


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [f for f in result["points"]]
    cols = swept + (["dataset"] if result.get("dataset") else [])
    if not cols:
        return
    fig, axes = plt.subplots(2, len(cols), figsize=(3.4 * len(cols), 6.0), dpi=120, squeeze=False)
    try:
        for j, factor in enumerate(cols):
            top, bot = axes[0][j], axes[1][j]
            if factor == "dataset":
                ds = result["dataset"]
                s = [r["size"] for r in ds["ham10000_computed"]]
                top.plot(s, [r["gib"] for r in ds["ham10000_computed"]], "o-", color="C2", label="N·S²·3 (computed)")
                top.set_title("data set: HAM10000 decoded cache", fontsize=9)
                top.set_ylabel("GiB on disk")
                bot.plot(s, [r["bytes"] / 2**20 for r in ds["ham10000_computed"]], "-", color="C2", label="file size")
                m = ds.get("measured")
                if m and "error" not in m:
                    h = m["ham10000_scaled"]
                    bot.plot([m["size"]], [h["mmap_read_rss_mib"]], "s", color="C0", label="mmap+read RSS (scaled)")
                    bot.plot([m["size"]], [h["copy_to_ram_rss_mib"]], "^", color="C3", label="copy in RAM (scaled)")
                bot.set_ylabel("MiB (HAM10000)")
                bot.set_xlabel("image size S (px)")
                for ax in (top, bot):
                    ax.legend(fontsize=7)
                    ax.grid(alpha=0.3)
                continue
            pts = result["points"][factor]
            a = result["dominant"].get(factor, {})
            for mode, color, mark in (("infer", "C0", "o"), ("train", "C3", "s")):
                ok = [p for p in pts if _ok(p.get(mode))]
                if not ok:
                    continue
                xs = [p["value"] for p in ok]
                pe = a.get(f"{mode}_time_exponent")
                lab = mode + (f" (p={pe:.2f})" if pe is not None else "")
                top.plot(xs, [p[mode]["s_per_image"] for p in ok], mark + "-", color=color, label=lab)
                cont = [p for p in ok if p[mode].get("contended")]
                if cont:
                    top.plot([p["value"] for p in cont], [p[mode]["s_per_image"] for p in cont], "x", color="k", ms=9)
                bot.plot(xs, [p[mode]["peak_rss_mib"] for p in ok], mark + "-", color=color, label=f"{mode} peak")
                bot.plot(xs, [max(p[mode]["delta_rss_mib"], 0.1) for p in ok], mark + "--", color=color, mfc="none")
            dom = a.get("infer_dominant_change", "n/a")
            top.set_title(f"{factor}: dominant {'none (flat)' if dom is None else dom}", fontsize=9)
            top.set_ylabel("s / image")
            bot.set_ylabel("RSS MiB (—peak, --increase)")
            bot.set_yscale("log")
            bot.set_xlabel(LABEL.get(factor, factor))
            ticks = sorted({p["value"] for p in pts})
            for ax in (top, bot):
                ax.set_xscale("log")
                ax.set_xticks(ticks, [str(t) for t in ticks])
                ax.minorticks_off()
                ax.grid(alpha=0.3, which="both")
                ax.legend(fontsize=7)
            top.set_yscale("log")
        fig.suptitle(
            "How cost grows (one factor at a time around the base; x = contended point)"
            + (" — QUICK smoke run" if result["setting"]["quick"] else ""),
            fontsize=10,
        )
        fig.tight_layout()
        _atomic_write(path, lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)


# -------------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--factors", default=",".join(FACTORS), help=f"comma-separated subset of {','.join(FACTORS)}")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per point (default 3; --quick: 1)")
    ap.add_argument(
        "--max-images",
        type=int,
        default=0,
        help="cap on timed images per point: timed calls = min(repeats, ceil(max_images / B)) (default 0: no cap)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads in every subprocess")
    ap.add_argument("--quick", action="store_true", help="smoke run: 32-64 px, width 64, batch 2, 1 repeat")
    ap.add_argument("--dataset-n", type=int, default=None, help="synthetic cache images (default 2000; quick 100)")
    ap.add_argument("--dataset-size", type=int, default=None, help="synthetic cache px (default 224; quick 64)")
    ap.add_argument(
        "--wait-quiet", type=float, default=0.0, help="before each point, wait up to this many s for a quiet CPU"
    )
    ap.add_argument("--point-timeout", type=float, default=900.0, help="seconds allowed per subprocess")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-json", default=None, help="default benchmarks/results/scaling-latest.json")
    ap.add_argument("--out-md", default=None, help="default benchmarks/results/scaling-latest.md")
    ap.add_argument("--out-fig", default=None, help="default docs/figures/cost_scaling.png")
    ap.add_argument("--force", action="store_true", help="replace existing outputs whose name has no '-latest'")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one point (JSON spec)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.one is not None:
        emit(run_one(json.loads(args.one)))
        return 0
    t_start = time.perf_counter()
    factors = [f.strip() for f in args.factors.split(",") if f.strip()]
    bad = [f for f in factors if f not in FACTORS]
    if bad:
        raise SystemExit(f"--factors: unknown {bad}; choose from {','.join(FACTORS)}")
    quick = args.quick
    base, sweep = (QUICK_BASE, QUICK_SWEEP) if quick else (BASE, SWEEP)
    repeats = args.repeats if args.repeats is not None else (1 if quick else 3)
    ds_n = args.dataset_n or (100 if quick else 2000)
    ds_size = args.dataset_size or (64 if quick else 224)
    if cache_bytes(ds_n, ds_size) > 10**9:
        raise SystemExit("--dataset-n x --dataset-size: the synthetic cache would exceed 1 GB of disk")
    stem = "scaling-quick-latest" if quick else "scaling-latest"
    res_dir = ROOT / "benchmarks" / "results"
    outs = {
        "json": Path(args.out_json or res_dir / f"{stem}.json"),
        "md": Path(args.out_md or res_dir / f"{stem}.md"),
        "fig": Path(
            args.out_fig or (res_dir / f"{stem}.png" if quick else ROOT / "docs" / "figures" / "cost_scaling.png")
        ),
    }
    clash = [str(p) for p in outs.values() if p.exists() and "-latest" not in p.name and not args.force]
    if clash:
        log(f"[bench_scaling] refusing to overwrite {clash} (pass --force, or choose other --out-* paths)")
        return 2

    threads = set_threads(args.threads)
    # ---- the measurement plan: unique (mode, configuration) pairs ---------------------------------------
    jobs: dict[str, dict] = {}
    points: dict[str, list[dict]] = {}
    for f in factors:
        if f == "dataset":
            continue
        points[f] = []
        for v in sweep[f]:
            cfg = {**base, f: v}
            p = {"value": v, "cfg": cfg}
            for mode in ("infer", "train") if f in TRAIN_FACTORS else ("infer",):
                if mode == "train" and cfg["batch"] < TRAIN_MIN_BATCH:
                    p[mode] = {"skipped": f"training needs batch >= {TRAIN_MIN_BATCH} (BatchNorm in training mode)"}
                    continue
                key = mode + json.dumps(cfg, sort_keys=True)
                n_timed = timed_calls(repeats, args.max_images, cfg["batch"])
                jobs.setdefault(
                    key, {"mode": mode, "cfg": cfg, "n_timed": n_timed, "threads": threads, "seed": args.seed}
                )
                p[mode] = key
            points[f].append(p)
    log(
        f"[bench_scaling] {'QUICK ' if quick else ''}factors={factors} base={base} repeats={repeats} "
        f"threads={threads}: {len(jobs)} subprocesses" + (" + dataset" if "dataset" in factors else "")
    )
    done: dict[str, dict] = {}
    for i, (key, spec) in enumerate(jobs.items(), 1):
        if args.wait_quiet > 0:
            wait_for_quiet(args.wait_quiet)
        cfg = spec["cfg"]
        log(
            f"[bench_scaling] ({i}/{len(jobs)}) {spec['mode']} S={cfg['size']} C={cfg['classes']} K={cfg['K']} "
            f"B={cfg['batch']} x{spec['n_timed']} ... (elapsed {time.perf_counter() - t_start:.0f} s)"
        )
        out = spawn(spec, threads, args.point_timeout)
        done[key] = out
        if "error" in out:
            log(f"[bench_scaling]   FAILED: {out['error']}")
        else:
            log(
                f"[bench_scaling]   {out['s_per_image']:.4f} s/image, peak RSS {out['peak_rss_mib']} MiB, "
                f"foreign CPU {out['foreign_cpu_share_median']} (subprocess {out['wall_s']} s)"
            )
    for f, pts in points.items():
        for p in pts:
            for mode in ("infer", "train"):
                ref = p.get(mode)  # a job key until the job ran
                if isinstance(ref, str):
                    p[mode] = done[ref]
    dataset: dict[str, Any] | None = None
    if "dataset" in factors:
        sizes = sorted(set(sweep["size"]) | {ds_size})
        dataset = {
            "ham10000_computed": [
                {"size": s, "bytes": cache_bytes(HAM10000_N, s), "gib": round(cache_bytes(HAM10000_N, s) / 2**30, 3)}
                for s in sizes
            ]
        }
        log(
            f"[bench_scaling] dataset: synthetic cache {ds_n} x {ds_size} px ({cache_bytes(ds_n, ds_size) / 2**20:.0f} MiB)"
        )
        dataset["measured"] = spawn(
            {"mode": "dataset", "n": ds_n, "size": ds_size, "threads": threads}, threads, args.point_timeout
        )
    dominant = {f: analyse_factor(f, pts) for f, pts in points.items()}
    if dataset is not None:
        dominant["dataset"] = analyse_dataset(dataset)
    for f, a in dominant.items():
        log(f"[bench_scaling] {f}: {a['statement']}")
    contended = [
        f"{f}={p['value']}:{m}"
        for f, pts in points.items()
        for p in pts
        for m in ("infer", "train")
        if (p.get(m) or {}).get("contended")
    ]
    result: dict[str, Any] = {
        "benchmark": "scaling",
        "command": "python benchmarks/bench_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setting": {
            "quick": quick,
            "base": base,
            "sweep": {f: sweep[f] for f in factors if f in sweep},
            "encoder": "resnet18",
            "dcg": "resnet18+resnet18 (6 ROIs, 32 px)",
            "weights": "random init",
            "sampler": "goal-1: ddim, 5 calls, start=mean, t_start=window-1, K = the point's K",
            "train_step": "diffmic.training.step.PlainStep, default settings (bench_train OURS)",
            "warmup": "one call on the full batch",
            "repeats": repeats,
            "max_images": args.max_images,
            "threads": threads,
        },
        "points": points,
        "dominant": dominant,
        "dataset": dataset,
        "contended_points": contended,
        "reliable": not contended,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "outputs": {k: str(v) for k, v in outs.items()},
        "machine": machine_info(torch.device("cpu")),
    }
    _atomic_write(outs["json"], lambda p: p.write_text(json.dumps(result, indent=1, default=str) + "\n"))
    _atomic_write(outs["md"], lambda p: p.write_text(markdown(result)))
    figure(result, outs["fig"])
    log(f"[bench_scaling] wrote {outs['json']}, {outs['md']}, {outs['fig']} in {result['wall_s']:.0f} s")
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
