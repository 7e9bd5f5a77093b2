"""Absolute inference latency of the default preset with DDIM-10.

Setting: 224 px, ResNet-18 image encoder, ResNet-18 DCG streams, denoiser width 6144, C = 7, random-init
weights in eval mode, ``reverse_sample(model, schedule, x, sampler="ddim", steps=10, noise=...)``
(DCG once, encoder once, 10 denoiser-head calls). Batch 1 and batch 32 (``--batches``); each is timed as the
median of ``--repeats`` calls after ``--warmup`` untimed calls (on CPU only calls during which other programs
used ≤ 10 % of the machine count; up to ``--repeats`` extra calls are made to get at least 3 of them). The paper reports 0.056 s per image on an
RTX 3090 (its sampler and batch size are not stated in the same way; the comparison is indicative only).

Variants (each on its own copy of the same weights; predictions compared with the fp32 eager run):

* ``eager``         — fp32, default memory format (always);
* ``channels_last`` — model and input in ``torch.channels_last`` (always);
* ``bf16``          — ``torch.autocast(device_type, dtype=torch.bfloat16)`` (default on CUDA; ``--bf16`` on CPU);
* ``bf16_channels_last`` — both (CUDA only, with bf16);
* ``compile``       — ``torch.compile`` of the denoiser head (``--compile``; compile time reported apart).

Usage:  python benchmarks/bench_latency.py [--compile] [--bf16] [--device auto] [--batches 1,32]
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from diffmic.diffusion.reverse import reverse_sample  # noqa: E402
from diffmic.diffusion.samplers import num_noise_draws  # noqa: E402
from diffmic.diffusion.schedule import NoiseSchedule  # noqa: E402
from diffmic.nn.denoiser import ConditionalDenoiser  # noqa: E402
from diffmic.nn.diffmic import DiffMIC  # noqa: E402

from _common import Phase, emit, log, machine_info, pick_device, set_threads, sync, wait_for_quiet  # noqa: E402

PAPER_S_PER_IMAGE = 0.056  # RTX 3090, DiffMIC paper


def _variant_model(model: DiffMIC, name: str) -> DiffMIC:
    if name == "eager" or name == "bf16":
        return model
    m = copy.deepcopy(model)
    if "channels_last" in name:
        m = m.to(memory_format=torch.channels_last)
    if name == "compile":
        # torch.compile returns an OptimizedModule that stands in for the module, typed as a plain callable
        m.denoiser = cast(ConditionalDenoiser, torch.compile(m.denoiser, dynamic=False))
    return m


def _measure(model, schedule, x, noise, steps, autocast, repeats, warmup, device, wait_s):
    """Warm-up calls, then ``repeats`` timed calls (plus up to ``repeats`` extra ones, each after waiting up to
    ``wait_s`` for a quiet CPU, while fewer than min(3, repeats) calls ran uncontended).
    Returns (y0, warm-up seconds, [seconds], [foreign CPU shares])."""
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def call():
        with ctx():
            return reverse_sample(model, schedule, x, sampler="ddim", steps=steps, noise=noise).y0[:, 0].float()

    sync(device)
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        y0 = call()
    sync(device)
    t_warm = time.perf_counter() - t0
    secs: list[float] = []
    shares: list[float | None] = []
    extra = 0
    while True:
        n_clean = sum((f or 0) <= 0.1 for f in shares)
        if len(secs) >= repeats and (n_clean >= min(3, repeats) or extra >= repeats):
            break
        if len(secs) >= repeats:  # other programs were using the CPU: wait, then an extra repeat
            extra += 1
            wait_for_quiet(wait_s)
        with Phase(device) as ph:
            y0 = call()
        secs.append(ph.seconds)
        shares.append(ph.foreign_cpu_share)
    return y0, t_warm, secs, shares


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps (default 10)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per batch size (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    ap.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, ...")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the denoiser head")
    ap.add_argument("--bf16", action="store_true", help="also time bf16 autocast on CPU (always on for CUDA)")
    ap.add_argument("--no-channels-last", action="store_true", help="skip the channels_last variant")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--width", type=int, default=6144)
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: os.cpu_count())")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=30.0,
        help="before each variant, wait up to this many seconds for other programs to leave the CPU",
    )
    args = ap.parse_args(argv)

    threads = set_threads(args.threads)
    device = pick_device(args.device)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    torch.manual_seed(args.seed)
    model = DiffMIC(args.classes, hidden_dim=args.width).to(device).eval()
    schedule = NoiseSchedule.build().to(device)
    C = args.classes
    draws = num_noise_draws("ddim", schedule.num_timesteps, args.steps, 0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    inputs = {}
    for b in batches:
        x = torch.randn(b, 3, args.image_size, args.image_size, generator=gen).to(device)
        inputs[b] = (x, torch.randn(draws, b, C, generator=gen).to(device))

    variants = ["eager"]
    if not args.no_channels_last:
        variants.append("channels_last")
    if device.type == "cuda" or args.bf16:
        variants.append("bf16")
        if device.type == "cuda" and not args.no_channels_last:
            variants.append("bf16_channels_last")
    if args.compile:
        variants.append("compile")
    log(f"[bench_latency] device={device} threads={threads} batches={batches} variants={variants}")

    results: dict = {}
    reference: dict = {}
    for name in variants:
        quiet = wait_for_quiet(args.wait_quiet) if device.type == "cpu" else None
        m = _variant_model(model, name)
        entry: dict = {"pre_wait": quiet}
        for b in batches:
            x, noise = inputs[b]
            if "channels_last" in name:
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                y0, t_warm, secs, shares = _measure(
                    m,
                    schedule,
                    x,
                    noise,
                    args.steps,
                    name.startswith("bf16"),
                    args.repeats,
                    args.warmup,
                    device,
                    min(args.wait_quiet, 15.0) if device.type == "cpu" else 0.0,
                )
            except Exception as exc:  # e.g. torch.compile without a working C++ toolchain
                entry[f"batch_{b}"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                log(f"[bench_latency] {name} batch {b}: FAILED {type(exc).__name__}: {exc}")
                continue
            clean = [t for t, f in zip(secs, shares) if (f or 0) <= 0.1]
            med = statistics.median(clean or secs)
            if name == "eager":
                reference[b] = y0
            ref = reference.get(b)
            row = {
                "latency_per_image_s": round(med / b, 5),
                "batch_latency_s": round(med, 4),
                "images_per_s": round(b / med, 2),
                "repeats_s": [round(s, 4) for s in secs],
                "warmup_s": round(t_warm, 3),
                "foreign_cpu_share": shares,
                "statistic": f"median of {len(clean)} uncontended calls"
                if clean
                else "median of all calls (all contended)",
                "contended": not clean,
                "vs_paper_3090": round((med / b) / PAPER_S_PER_IMAGE, 2),
            }
            if ref is not None:
                row["argmax_agree_with_eager"] = round(float((y0.argmax(-1) == ref.argmax(-1)).float().mean()), 4)
                row["max_abs_diff_vs_eager"] = float((y0 - ref).abs().max())
            entry[f"batch_{b}"] = row
            log(
                f"[bench_latency] {name:18s} batch {b:3d}: {med / b * 1000:8.1f} ms/image "
                f"({b / med:7.2f} img/s), repeats {[round(s, 3) for s in secs]}, foreign {shares}"
            )
        results[name] = entry
        if m is not model:
            del m

    summary = {}
    for b in batches:
        eager = results["eager"].get(f"batch_{b}", {}).get("latency_per_image_s")
        for name in variants[1:]:
            v = results[name].get(f"batch_{b}", {}).get("latency_per_image_s")
            if eager and v:
                summary[f"{name}_speedup_vs_eager_batch_{b}"] = round(eager / v, 3)
    contended_rows = [
        r.get("contended", False) for e in results.values() for k, r in e.items() if k.startswith("batch_")
    ]
    out = {
        "benchmark": "latency",
        "command": "python benchmarks/bench_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setting": {
            "image_size": args.image_size,
            "sampler": "ddim",
            "steps": args.steps,
            "batches": batches,
            "encoder": "resnet18",
            "dcg": "resnet18+resnet18",
            "width": args.width,
            "classes": C,
            "weights": "random init, eval mode",
            "repeats": args.repeats,
            "statistic": "median",
        },
        "paper_s_per_image_rtx3090": PAPER_S_PER_IMAGE,
        "variants": results,
        "speedups_vs_eager": summary,
        "contended": any(contended_rows),
        "reliable": not any(contended_rows),
        "machine": machine_info(device),
    }
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
