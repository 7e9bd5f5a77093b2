"""GPU throughput at 224 px: training and inference images/s, fp32 / bf16 autocast x default / channels-last.

Setting: the default model preset (ResNet-18 encoder, ResNet-18 DCG streams, denoiser width 6144, C = 7,
T = 1000), random-init weights. Training = the library's step (``diffmic.training.step.PlainStep``: DCG priors
without grad, one encoder pass for the three denoiser branches, Adam + clip, DCG cross-entropy step; the
optimisers of ``build_optimizers``, fused Adam except under bf16 as with ``train.precision=bf16-mixed``).
Inference = ``reverse_sample`` with the released truncated-250 chain (K = 1) and with the few-step sampler of
goal 1 (``bench_inference.FEWSTEP``, from the prior mean over the truncated window).

Each figure: ``--warmup`` untimed iterations, then the median of ``--iters`` timed ones (CUDA-synchronised).
Runs on any device (``--device auto``); on a CPU it is merely slow. Not measured on a GPU yet in this
project (no GPU was available when it was written): run it where there is one.

Usage:  python benchmarks/bench_gpu.py [--batch 64] [--iters 10] [--device auto]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from bench_inference import FEWSTEP  # noqa: E402
from diffmic.config import config_from_dict  # noqa: E402
from diffmic.diffusion.process import antithetic_timesteps  # noqa: E402
from diffmic.diffusion.reverse import reverse_sample  # noqa: E402
from diffmic.diffusion.schedule import NoiseSchedule  # noqa: E402
from diffmic.nn.diffmic import DiffMIC  # noqa: E402
from diffmic.training.step import PlainStep  # noqa: E402

from _common import emit, log, machine_info, pick_device, set_threads, sync  # noqa: E402


def _median_time(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    secs = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        secs.append(time.perf_counter() - t0)
    return statistics.median(secs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--truncated-steps", type=int, default=250)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(0)
    B, C, S = args.batch, 7, args.image_size
    base = DiffMIC(C, hidden_dim=6144).to(device)
    schedule = NoiseSchedule.build().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, S, S, generator=g).to(device)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    t = antithetic_timesteps(B, schedule.num_timesteps).to(device)
    eps = torch.randn(B, C, generator=g).to(device)
    n = args.truncated_steps
    few = dict(sampler=FEWSTEP["sampler"], steps=FEWSTEP["steps"], start="mean", t_start=n - 1)
    out: dict = {
        "benchmark": "gpu_throughput",
        "device": str(device),
        "batch": B,
        "image_size": S,
        "fewstep_sampler": few,
        "results": {},
    }
    for prec in ("fp32", "bf16"):
        for fmt in ("default", "channels_last"):
            name = f"{prec}_{fmt}"
            model = copy.deepcopy(base)
            xv = x
            if fmt == "channels_last":
                model = model.to(memory_format=torch.channels_last)
                xv = x.contiguous(memory_format=torch.channels_last)
            ctx = (
                (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
                if prec == "bf16"
                else contextlib.nullcontext
            )
            step = PlainStep(model, config_from_dict(None, ["train.precision=bf16-mixed"] if prec == "bf16" else []))
            batch = {"image": xv, "label": y, "id": [f"img{i}" for i in range(B)]}

            def train():
                with ctx():
                    step(schedule, batch, (t, eps))

            def infer(kw):
                model.eval()
                with torch.inference_mode(), ctx():
                    reverse_sample(model, schedule, xv, **kw)

            row = {}
            try:
                row["train_images_per_s"] = round(B / _median_time(train, device, args.warmup, args.iters), 2)
                row["infer_truncated_images_per_s"] = round(
                    B
                    / _median_time(
                        lambda: infer(dict(sampler="truncated", steps=n)), device, 1, max(1, args.iters // 3)
                    ),
                    2,
                )
                row["infer_fewstep_images_per_s"] = round(
                    B / _median_time(lambda: infer(few), device, args.warmup, args.iters), 2
                )
            except RuntimeError as exc:  # e.g. bf16 unsupported on this device: report, do not hide
                row["error"] = str(exc)[:300]
            if device.type == "cuda":
                row["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                torch.cuda.reset_peak_memory_stats()
            out["results"][name] = row
            log(f"[bench_gpu] {name}: {row}")
    out["machine"] = machine_info(device)
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
