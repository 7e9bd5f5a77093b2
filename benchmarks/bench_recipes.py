"""The CPU recipes side by side: one training step and one image (goal 4 of issue 27).

For each preset (default: ``cpu_v1``, the recipe until 2026-12-03, and ``cpu``, recipe v2), the network
the preset builds (``DiffMIC(**model_kwargs(cfg))``, its pretrained weights where it has them, its frozen
stages) is timed on random inputs of the preset's size, interleaved round by round:

* ``train_step_s``: one joint-stage training step (:class:`diffmic.training.step.PlainStep`: the step the
  LightningModule runs, with the preset's optimisers) at the preset's batch size;
* ``train_image_s``: the same per training image;
* ``one_image_s``: one image at batch 1 through ``reverse_sample`` with the preset's evaluation settings
  (sampler, steps, K samples, point read-out), the networks included, decoding excluded.

Medians over ``--repeats`` rounds. The last stdout line is one JSON object with the ratios of each preset
against the first.

Usage:  python benchmarks/bench_recipes.py [--presets cpu_v1,cpu] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ForeignLoad, emit, log, machine_info, set_threads, wait_for_quiet  # noqa: E402


def build(preset: str, classes: int, seed: int) -> dict:
    from diffmic.config import load_config, model_kwargs
    from diffmic.diffusion.schedule import NoiseSchedule
    from diffmic.nn.diffmic import DiffMIC
    from diffmic.training.step import PlainStep

    cfg = load_config(preset)
    torch.manual_seed(seed)
    model = DiffMIC(classes, **model_kwargs(cfg))
    d = cfg.diffusion
    schedule = NoiseSchedule.build(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
    gen = torch.Generator().manual_seed(seed + 1)
    B, S = cfg.data.batch_size, cfg.data.image_size

    def batch():
        x = torch.randn(B, cfg.data.in_chans, S, S, generator=gen)
        y = torch.randint(0, classes, (B,), generator=gen)
        return {"image": x, "label": y, "id": [f"img{i}" for i in range(B)]}  # the step draws its own t, ε

    return {
        "cfg": cfg,
        "model": model,
        "step": PlainStep(model, cfg),
        "schedule": schedule,
        "batch": batch,
        "image": torch.randn(1, cfg.data.in_chans, S, S, generator=gen),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="cpu_v1,cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--wait-quiet", type=float, default=0.0)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)

    from diffmic.diffusion.reverse import reverse_sample

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    built = {p: build(p, args.classes, args.seed) for p in presets}
    times: dict[str, dict[str, list[float]]] = {p: {"train_step_s": [], "one_image_s": []} for p in presets}

    def one_image(b: dict) -> None:
        m, cfg = b["model"], b["cfg"]
        m.eval()
        with torch.inference_mode():
            reverse_sample(m, b["schedule"], b["image"], **cfg.eval.reverse_kwargs(), ids=["x"])

    for b in built.values():  # warm-up: optimiser state, allocator, kernels
        b["step"](b["schedule"], b["batch"]())
        one_image(b)
    load = ForeignLoad()
    for rnd in range(max(1, args.repeats)):
        for p, b in built.items():
            data = b["batch"]()
            s0 = time.perf_counter()
            b["step"](b["schedule"], data)
            times[p]["train_step_s"].append(time.perf_counter() - s0)
            s0 = time.perf_counter()
            one_image(b)
            times[p]["one_image_s"].append(time.perf_counter() - s0)
        log(
            f"[recipes] round {rnd + 1}: "
            + ", ".join(f"{p} step {v['train_step_s'][-1]:.2f}s" for p, v in times.items())
        )
    foreign = load.share()
    result: dict = {}
    for p, b in built.items():
        cfg = b["cfg"]
        med = {k: statistics.median(v) for k, v in times[p].items()}
        result[p] = {
            "image_size": cfg.data.image_size,
            "batch": cfg.data.batch_size,
            "encoder": cfg.model.encoder,
            "dcg": [cfg.model.dcg_global, cfg.model.dcg_local],
            "eval": cfg.eval.reverse_kwargs(),
            "train_step_s": round(med["train_step_s"], 4),
            "train_image_s": round(med["train_step_s"] / cfg.data.batch_size, 5),
            "one_image_s": round(med["one_image_s"], 4),
            "runs": {k: [round(x, 4) for x in v] for k, v in times[p].items()},
        }
    base = presets[0]
    ratios = {
        p: {
            k: round(result[p][k] / result[base][k], 2)
            for k in ("train_step_s", "train_image_s", "one_image_s")
            if result[base][k]
        }
        for p in presets[1:]
    }
    emit(
        {
            "benchmark": "recipes",
            "setting": {
                "presets": presets,
                "repeats": args.repeats,
                "classes": args.classes,
                "inputs": "random images of each preset's size; one joint-stage step (PlainStep) at its batch size",
                "timing": "median wall time over the rounds, presets interleaved",
            },
            "threads": threads,
            "presets": result,
            f"ratio_vs_{base}": ratios,
            "foreign_cpu_share": foreign,
            "contended": foreign is not None and foreign > 0.1,
            "waited_for_quiet": quiet,
            "machine": machine_info(torch.device("cpu")),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
