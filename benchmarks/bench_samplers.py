"""DDIM-10 vs the full 1000-step chain vs the released truncated 250-step chain, from ONE checkpoint.

Reports, for each sampler, test accuracy / macro-F1 on the run's test split and images/s of the
evaluation pass ``diffmic test`` runs (the reverse process and the read-out, with the run's other
``eval.*`` settings; the encoder and DCG run once per image in all three; what differs is the
number of denoiser calls). The last stdout line is a JSON object.

    python benchmarks/bench_samplers.py --run runs/demo            # HAM10000 test split (3,004 images)
    python benchmarks/bench_samplers.py --run runs/demo --limit 512 # first 512 test images only
    python benchmarks/bench_samplers.py --run RUN --num-samples 8   # K = 8 samples per image, mean read-out
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def evaluate(module, loader, sampler: str, steps: int | None, limit: int | None, num_samples: int = 1) -> dict:
    """Test accuracy / macro-F1 with ``eval.sampler = sampler``, ``eval.steps = steps`` and
    ``eval.num_samples = num_samples`` (the run's other eval settings unchanged), through the
    LightningModule's own evaluation pass (``DiffMICModule.scores``, what ``diffmic test`` runs);
    only that pass is timed."""
    from diffmic.config import config_from_dict
    from diffmic.metrics import classification_metrics

    saved = module.cfg
    d = saved.to_dict()
    module.cfg = config_from_dict(
        {**d, "eval": {**d["eval"], "sampler": sampler, "steps": steps, "num_samples": num_samples}}
    )
    metrics = classification_metrics(module.num_classes).to(module.device)
    n = 0
    elapsed = 0.0
    try:
        with torch.no_grad():
            for batch in loader:
                if limit is not None and n >= limit:
                    break
                batch = {**batch, "image": batch["image"].to(module.device)}
                y = batch["label"].to(module.device)
                if module.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                probs, _, _ = module.scores(batch, "test")
                if module.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed += time.perf_counter() - t0
                metrics.update(probs, y)
                n += y.shape[0]
    finally:
        module.cfg = saved
    v = metrics.compute()
    return {
        "sampler": sampler,
        "steps": steps,
        "num_samples": num_samples,
        "images": n,
        "seconds": elapsed,
        "images_per_s": n / elapsed,
        "acc": float(v["acc"]),
        "f1": float(v["f1"]),
        "balanced_acc": float(v["balanced_acc"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--ckpt")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--num-samples", type=int, default=1, help="K reverse samples per image, mean read-out (released: 1)"
    )
    ap.add_argument("--truncated-steps", type=int, default=250, help="released: 250 HAM10000, 60 APTOS")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from diffmic.config import load_config
    from diffmic.training.checkpoint import load_module
    from diffmic.training.run import build_datamodule, resolve_checkpoint

    run = Path(args.run)
    cfg = load_config(run / "config.yaml")
    dm = build_datamodule(cfg)
    dm.setup("test")
    ckpt = resolve_checkpoint(run, args.ckpt)
    module = load_module(ckpt, expected_class_names=list(dm.class_names))
    device = torch.device(
        "cuda"
        if (args.device == "auto" and torch.cuda.is_available())
        else ("cpu" if args.device == "auto" else args.device)
    )
    module = module.to(device).eval()
    loader = dm.test_dataloader()
    results = [
        evaluate(module, loader, "ddim", 10, args.limit, args.num_samples),
        evaluate(module, loader, "truncated", args.truncated_steps, args.limit, args.num_samples),
        evaluate(module, loader, "ddpm", None, args.limit, args.num_samples),
    ]
    by = {f"{r['sampler']}{r['steps'] or ''}": r for r in results}
    summary = {
        "benchmark": "samplers",
        "checkpoint": str(ckpt),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "num_samples": args.num_samples,
        "results": results,
        "speedup_ddim10_vs_ddpm1000": by["ddim10"]["images_per_s"] / by["ddpm"]["images_per_s"],
        "speedup_ddim10_vs_truncated": by["ddim10"]["images_per_s"]
        / by[f"truncated{args.truncated_steps}"]["images_per_s"],
        "acc_points_ddim10_minus_ddpm1000": 100 * (by["ddim10"]["acc"] - by["ddpm"]["acc"]),
        "acc_points_ddim10_minus_truncated": 100
        * (by["ddim10"]["acc"] - by[f"truncated{args.truncated_steps}"]["acc"]),
    }
    for r in results:
        print(
            f"{r['sampler']:>9} {str(r['steps']):>5}: acc {r['acc']:.4f} f1 {r['f1']:.4f} {r['images_per_s']:.1f} img/s"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
