"""Inference speed: the library's reverse sampler vs the released algorithm (same weights, same noise).

OURS      = ``diffmic.diffusion.reverse.reverse_sample(model, schedule, x, sampler="truncated",
            steps=250, noise=noise)``: DCG once per batch (vectorised ROI crops), image encoder once per
            image, only the denoiser head at each of the 250 reverse steps.
BASELINE  = the released ``test()`` algorithm (``benchmarks/_released.py``): the DCG twice per batch with a
            per-sample host-synced Python crop loop, and the image encoder + full denoiser re-run at every one
            of the 250 reverse steps.

Setting: 224 px, ResNet-18 image encoder, ResNet-18 DCG streams, denoiser width 6144, C = 7, truncated
250-step sampler (the released ISIC ``test_timesteps``), random-init weights in eval mode.
Both runs use the same ``[steps, B, C]`` noise tensor; the script asserts equal predictions
(argmax equal for every image, max |Δy0| < --tol) and exits non-zero otherwise.

Usage:  python benchmarks/bench_inference.py [--batch 32] [--steps 250] [--device auto]
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from diffmic.diffusion.reverse import reverse_sample  # noqa: E402
from diffmic.diffusion.schedule import NoiseSchedule  # noqa: E402
from diffmic.nn.diffmic import DiffMIC  # noqa: E402

from _common import (  # noqa: E402
    Phase,
    best_of,
    cpu_busy_s,
    emit,
    log,
    machine_info,
    own_cpu_s,
    pick_device,
    set_threads,
    wait_for_quiet,
)  # noqa: E402
from _released import released_dcg_forward, released_reverse  # noqa: E402


class StepClock:
    """Transparent proxy of the model that stamps every ``eps`` call (one per reverse step) with the wall time,
    the machine's busy CPU time and this process's CPU time. Nothing else changes.

    CPU only. It yields a contention-robust estimate of the run, ``prefix + n · median(clean step)``:
    consecutive steps are grouped into windows of at least ``window_s`` seconds, a window is *clean* when
    other programs used at most ``threshold`` of the machine during it, and the median is taken over the
    steps in clean windows. ``prefix`` is the time before the first step (DCG, encoder); when the prefix
    itself was contended, ``prefix_fallback`` (from the best-of-3 component timings) replaces it. With too
    few clean steps (< max(5, 10 % of n)) the estimate is ``None``: the run cannot be judged.
    """

    def __init__(self, model) -> None:
        self._model = model
        self.stamps: list[tuple[float, float, float]] = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    @staticmethod
    def _now() -> tuple[float, float, float]:
        return time.perf_counter(), cpu_busy_s() or 0.0, own_cpu_s()

    def start(self) -> None:
        self.stamps = [self._now()]

    def eps(self, *args, **kwargs):
        self.stamps.append(self._now())
        return self._model.eps(*args, **kwargs)

    def robust_seconds(self, prefix_fallback: float, window_s: float = 0.5, threshold: float = 0.1) -> dict:
        end = self._now()
        st = self.stamps + [end]  # [start, step_1 … step_n, end]
        n = len(st) - 2
        if n < 2:
            return {"seconds": None}
        ncpu = os.cpu_count() or 1

        def share(a, b):
            dt = b[0] - a[0]
            return max(0.0, (b[1] - a[1]) - (b[2] - a[2])) / (dt * ncpu) if dt > 0 else 0.0

        prefix = st[1][0] - st[0][0]
        prefix_share = share(st[0], st[1])
        steps = list(range(1, n + 1))  # interval i spans st[i] -> st[i+1]
        clean: list[float] = []
        i = 1
        while i <= n:
            j = i
            while j < n and st[j + 1][0] - st[i][0] < window_s:
                j += 1
            if share(st[i], st[j + 1]) <= threshold:
                clean += [st[k + 1][0] - st[k][0] for k in range(i, j + 1)]
            i = j + 1
        all_iv = [st[k + 1][0] - st[k][0] for k in steps]
        out = {
            "prefix_s": round(prefix, 4),
            "prefix_foreign_cpu_share": round(prefix_share, 3),
            "median_step_s_all": round(statistics.median(all_iv), 5),
            "clean_steps": len(clean),
            "steps": n,
        }
        if len(clean) < max(5, n // 10):
            out["seconds"] = None
            return out
        med = statistics.median(clean)
        pre = prefix if prefix_share <= threshold else min(prefix, prefix_fallback)
        out.update({"seconds": round(pre + n * med, 3), "median_step_s_clean": round(med, 5)})
        return out


def component_times(model, x, steps: int, device) -> dict:
    """Best-of-3 timings of the pieces and the speedup they predict:
    baseline ≈ 2·DCG_loop + n·(encoder + head), ours ≈ DCG + encoder + n·head."""
    B = x.shape[0]
    with torch.no_grad():
        t_dcg_vec = best_of(lambda: model.guide(x), device)
        t_dcg_loop = best_of(lambda: released_dcg_forward(model.dcg, x), device)
        t_enc = best_of(lambda: model.encode(x), device)
        feat = model.encode(x)
        mu = model.priors(model.guide(x), B, device, x.dtype).fused
        tt = torch.full((B,), steps - 1, dtype=torch.long, device=device)
        reps = 10
        t_head = best_of(lambda: [model.eps(feat, mu, tt, mu) for _ in range(reps)], device) / reps
    base = 2 * t_dcg_loop + steps * (t_enc + t_head)
    ours = t_dcg_vec + t_enc + steps * t_head
    return {
        "batch": B,
        "dcg_vectorised_s": round(t_dcg_vec, 4),
        "dcg_released_loop_s": round(t_dcg_loop, 4),
        "image_encoder_s": round(t_enc, 4),
        "denoiser_head_step_s": round(t_head, 5),
        "predicted_baseline_s": round(base, 2),
        "predicted_ours_s": round(ours, 2),
        "predicted_speedup": round(base / ours, 2),
    }


# The sampler of goal 1 (docs/performance.md): deterministic, from the prior mean, over the truncated
# chain's window t_start = n-1 ... 0 with this many network calls, K = 1.
FEWSTEP = {"sampler": "ddim", "steps": 5}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--batch",
        type=int,
        default=32,
        help="images per batch (default 32: the batch of Predictor.predict and diffmic predict; on the 2-core "
        "CPU the 6144-wide head is memory-bandwidth bound, so a larger batch amortises its weights)",
    )
    ap.add_argument("--steps", type=int, default=250, help="truncated sampler steps (released ISIC: 250)")
    ap.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, ...")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--width", type=int, default=6144, help="denoiser width")
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: os.cpu_count())")
    ap.add_argument("--tol", type=float, default=1e-3, help="max |y0_ours - y0_baseline| allowed")
    ap.add_argument("--repeats", type=int, default=2, help="OURS runs (the fastest is reported)")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="wait up to this many seconds for other programs to leave the CPU before timing",
    )
    ap.add_argument(
        "--sweep",
        default="8,32",
        help="other batch sizes for which only the component timings are measured and the speedup "
        "predicted (comma-separated; empty to skip)",
    )
    ap.add_argument("--no-baseline", action="store_true", help="time OURS only (no comparison)")
    ap.add_argument("--fewstep-sampler", default=FEWSTEP["sampler"], help="goal-1 sampler (ddim | dpmpp2m)")
    ap.add_argument(
        "--fewstep-steps",
        type=int,
        default=FEWSTEP["steps"],
        help="goal-1 sampler: network calls, from the prior mean at t_start = steps - 1 of the truncated window",
    )
    args = ap.parse_args(argv)

    threads = set_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda":  # exact fp32 for the equality check
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(args.seed)
    model = DiffMIC(args.classes, hidden_dim=args.width).to(device).eval()
    schedule = NoiseSchedule.build().to(device)
    gen = torch.Generator().manual_seed(args.seed + 1)
    B, C, n = args.batch, args.classes, args.steps
    x = torch.randn(B, 3, args.image_size, args.image_size, generator=gen).to(device)
    noise = torch.randn(n, B, C, generator=gen).to(device)
    log(f"[bench_inference] device={device} threads={threads} batch={B} steps={n} size={args.image_size}")

    quiet = wait_for_quiet(args.wait_quiet) if device.type == "cpu" else None
    # ---- warm-up (short chains: allocator, kernels, lazy init) -------------------------------------
    wn = torch.randn(2, B, C, generator=gen).to(device)
    reverse_sample(model, schedule, x, sampler="truncated", steps=2, noise=wn)
    if not args.no_baseline:
        released_reverse(model, schedule, x, 2, wn)

    # ---- component timings (best of 3; explain the ratio) --------------------------------------------
    comp = component_times(model, x, n, device)
    t_dcg_vec, t_dcg_loop, t_enc = comp["dcg_vectorised_s"], comp["dcg_released_loop_s"], comp["image_encoder_s"]

    # ---- OURS (best of --repeats) -------------------------------------------------------------------
    ours_runs: list[Phase] = []
    ours_robust: list[dict] = []  # per run: the contention-robust estimate (StepClock.robust_seconds)
    for r in range(max(1, args.repeats)):
        log(f"[bench_inference] OURS run {r + 1}: reverse_sample(sampler='truncated', steps={n}) ...")
        clock = StepClock(model)
        use_clock = device.type == "cpu"
        with Phase(device) as ph:
            clock.start()
            out = reverse_sample(clock if use_clock else model, schedule, x, sampler="truncated", steps=n, noise=noise)
        robust = clock.robust_seconds(t_dcg_vec + t_enc) if use_clock else {"seconds": None}
        ours_runs.append(ph)
        ours_robust.append(robust)
        log(
            f"[bench_inference]   {ph.seconds:.2f}s ({B / ph.seconds:.2f} img/s), "
            f"foreign CPU share {ph.foreign_cpu_share}, robust {robust}"
        )
    i_best = min(range(len(ours_runs)), key=lambda i: ours_runs[i].seconds)
    best, best_robust = ours_runs[i_best], ours_robust[i_best]
    if device.type == "cpu":  # robust estimate: the smallest available one over the runs
        best_robust = min(ours_robust, key=lambda r: r.get("seconds") or float("inf"))
    t_ours = best.seconds
    y0_ours = out.y0[:, 0]
    result: dict = {
        "benchmark": "inference",
        "command": "python benchmarks/bench_inference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setting": {
            "image_size": args.image_size,
            "batch": B,
            "steps": n,
            "sampler": "truncated",
            "encoder": "resnet18",
            "dcg": "resnet18+resnet18",
            "width": args.width,
            "classes": C,
            "weights": "random init, eval mode",
            "seed": args.seed,
        },
        "ours": {
            "seconds": round(t_ours, 3),
            "images_per_s": round(B / t_ours, 3),
            "latency_per_image_s": round(t_ours / B, 4),
            "runs_s": [round(p.seconds, 3) for p in ours_runs],
            "memory": best.mem.report(),
            "foreign_cpu_share": best.foreign_cpu_share,
            "robust_estimate": best_robust,
        },
        "components_best_of_3": comp,
    }

    # ---- OURS with the few-step sampler of goal 1 (K = 1, deterministic from the prior mean) --------------
    few_kw = dict(sampler=args.fewstep_sampler, steps=args.fewstep_steps, start="mean", t_start=n - 1)
    reverse_sample(model, schedule, x, **few_kw)  # warm-up
    few_runs = []
    for r in range(max(1, args.repeats)):
        with Phase(device) as pf:
            reverse_sample(model, schedule, x, **few_kw)
        few_runs.append(pf)
    bf = min(few_runs, key=lambda p: p.seconds)
    result["fewstep"] = {
        "sampler": {**few_kw, "num_samples": 1},
        "seconds": round(bf.seconds, 4),
        "images_per_s": round(B / bf.seconds, 3),
        "latency_per_image_s": round(bf.seconds / B, 5),
        "foreign_cpu_share": bf.foreign_cpu_share,
        "speedup_vs_ours_truncated": round(t_ours / bf.seconds, 2),
    }
    log(f"[bench_inference] FEWSTEP {few_kw}: {bf.seconds:.3f}s ({B / bf.seconds:.1f} img/s)")

    ok = True
    if not args.no_baseline:
        log("[bench_inference] BASELINE: released algorithm (re-encode every step, DCG twice, looped crops) ...")
        clock = StepClock(model)
        with Phase(device) as pb:
            clock.start()
            y0_base, mu_base = released_reverse(clock if use_clock else model, schedule, x, n, noise)
        base_robust = clock.robust_seconds(2 * t_dcg_loop + t_enc) if use_clock else {"seconds": None}
        t_base = pb.seconds
        log(
            f"[bench_inference]   {t_base:.2f}s ({B / t_base:.2f} img/s), foreign CPU share "
            f"{pb.foreign_cpu_share}, robust {base_robust}"
        )
        max_diff = float((y0_ours - y0_base).abs().max())
        prior_diff = float((out.prior - mu_base).abs().max())
        argmax_equal = bool(torch.equal(y0_ours.argmax(-1), y0_base.argmax(-1)))
        ok = argmax_equal and max_diff < args.tol
        ratio = t_base / t_ours
        result["baseline"] = {
            "seconds": round(t_base, 3),
            "images_per_s": round(B / t_base, 3),
            "latency_per_image_s": round(t_base / B, 4),
            "memory": pb.mem.report(),
            "foreign_cpu_share": pb.foreign_cpu_share,
            "robust_estimate": base_robust,
        }
        result["speedup"] = round(ratio, 2)
        result["fewstep"]["speedup_vs_released"] = round(t_base / result["fewstep"]["seconds"], 2)
        result["fewstep"]["target_speedup"] = 50.0
        result["speedup_predicted_from_components"] = comp["predicted_speedup"]
        result["target_speedup"] = 10.0
        result["equality"] = {
            "argmax_equal_all": argmax_equal,
            "max_abs_diff_y0": max_diff,
            "max_abs_diff_prior": prior_diff,
            "tol": args.tol,
            "passed": ok,
        }
        shares = [p.foreign_cpu_share for p in (best, pb) if p.foreign_cpu_share is not None]
        contended = bool(shares and max(shares) > 0.1)
        result["contended"] = contended
        r_o, r_b = best_robust.get("seconds"), base_robust.get("seconds")
        result["speedup_robust"] = round(r_b / r_o, 2) if r_o and r_b else None
        # judge the target on the wall clock; if other programs shared the CPU, on the clean-step estimate;
        # if that is unavailable too, the run cannot be judged (null)
        if not contended:
            basis, judged = "wall_clock", ratio
        elif result["speedup_robust"]:
            basis, judged = "robust_estimate", result["speedup_robust"]
        else:
            basis, judged = "none (machine busy during the runs)", None
        result["meets_target"] = None if judged is None else bool(judged >= 10.0)
        result["meets_target_basis"] = basis
        result["reliable"] = judged is not None
    sweep = [int(b) for b in args.sweep.split(",") if b.strip() and int(b) != B]
    if sweep:
        rows = []
        for b in sweep:
            if device.type == "cpu":
                wait_for_quiet(min(args.wait_quiet, 30.0))
            xb = torch.randn(b, 3, args.image_size, args.image_size, generator=gen).to(device)
            with Phase(device) as ps:
                row = component_times(model, xb, n, device)
            row["foreign_cpu_share"] = ps.foreign_cpu_share
            row["contended"] = bool((ps.foreign_cpu_share or 0) > 0.1)  # if true, ignore this row's numbers
            rows.append(row)
            log(
                f"[bench_inference] sweep batch {b}: predicted speedup {row['predicted_speedup']}x "
                f"(foreign CPU share {ps.foreign_cpu_share})"
            )
        result["predicted_speedup_by_batch"] = rows
    result["pre_run_wait"] = quiet
    result["machine"] = machine_info(device)
    emit(result)
    if not ok:
        log("[bench_inference] FAILED: predictions differ between OURS and BASELINE")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
