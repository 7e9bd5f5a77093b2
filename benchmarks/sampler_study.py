"""Sampler study on a trained run: accuracy of few-step samplers against the truncated chain.

The encoders run once per image (features, DCG priors cached in ``<run>/sampler_study_cache.pt``),
then every sampler runs on the cached features with the same per-image noise as ``diffmic test``
(``diffmic.diffusion.reverse.per_image_noise``), so the truncated reference reproduces the run's
``test_metrics.json``. Selection is done on the validation split; test is reported beside it.

    python benchmarks/sampler_study.py --run runs/demo [--splits val,test] [--quick]

Prints one JSON object as its last stdout line (also written to ``<run>/sampler_study.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score  # noqa: E402

from diffmic.diffusion import samplers  # noqa: E402
from diffmic.diffusion.reverse import per_image_noise  # noqa: E402
from diffmic.metrics import readout  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import FEWSTEP  # noqa: E402


def log(msg: str) -> None:
    print(f"[sampler_study {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load(run: Path, ckpt: str):
    from diffmic.config import load_config
    from diffmic.training.checkpoint import load_module
    from diffmic.training.run import build_datamodule, resolve_checkpoint

    cfg = load_config(run / "config.yaml", [])
    module = load_module(resolve_checkpoint(run, ckpt))
    dm = build_datamodule(cfg)
    return cfg, module, dm


@torch.inference_mode()
def features(module, dm, split: str, batch: int = 128) -> dict:
    ds = dm.get_dataset(split)
    feats, mus, labels, ids = [], [], [], []
    model = module.model
    for s in range(0, len(ds), batch):
        items = [ds[i] for i in range(s, min(s + batch, len(ds)))]
        x = torch.stack([it["image"] for it in items])
        g = model.guide(x)
        mu = model.priors(g, x.shape[0], x.device, x.dtype).fused
        feats.append(model.encode(x))
        mus.append(mu)
        labels += [int(it["label"]) for it in items]
        ids += [str(it["id"]) for it in items]
    return {"feat": torch.cat(feats), "mu": torch.cat(mus), "label": torch.tensor(labels), "id": ids}


def cached_features(run: Path, module, dm, splits: list[str]) -> dict:
    path = run / "sampler_study_cache.pt"
    data = torch.load(path, weights_only=True) if path.exists() else {}
    missing = [s for s in splits if s not in data]
    if missing:
        dm.setup()
        for s in missing:
            t0 = time.perf_counter()
            data[s] = features(module, dm, s)
            log(f"{s}: {len(data[s]['id'])} images encoded in {time.perf_counter() - t0:.1f}s")
        torch.save(data, path)
    return data


@torch.inference_mode()
def run_sampler(module, d: dict, spec: dict, seed: int, chunk: int = 512) -> torch.Tensor:
    """y0 ``[N, K, C]`` for every image of the split ``d`` with the sampler ``spec``."""
    model, sched = module.model, module.schedule
    K = spec.get("K", 1)
    name = spec["sampler"]
    steps = spec.get("steps")
    eta = spec.get("eta", 0.0)
    out = []
    for s in range(0, len(d["id"]), chunk):
        feat = d["feat"][s : s + chunk]
        mu = d["mu"][s : s + chunk]
        ids = d["id"][s : s + chunk]
        B, C = mu.shape
        mu_k = mu.repeat_interleave(K, 0)
        feat_k = feat.repeat_interleave(K, 0)
        guide_k = mu_k if model.uses_guidance else None

        def eps_fn(y, t):
            return model.eps(feat_k, y, t, guide_k)

        draws = samplers.num_noise_draws(name, sched.num_timesteps, steps, eta)
        noise = per_image_noise(ids, seed, draws, K, C, mu.device, mu.dtype)
        kw = {k: spec[k] for k in ("start", "t_start") if k in spec}
        y0 = samplers.sample(name, eps_fn, sched, mu_k, steps=steps, eta=eta, noise=noise, **kw).y0
        out.append(y0.view(B, K, C))
    return torch.cat(out)


def score(y0: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict:
    C = y0.shape[-1]
    r = readout(y0, "mean", temperature)
    return {
        "acc": float(multiclass_accuracy(r.pred, labels, C, average="micro")),
        "f1": float(multiclass_f1_score(r.pred, labels, C, average="macro")),
        "pred": r.pred,
        "probs": r.probs,
    }


def candidates(T: int, ref_steps: int, ref_k: int, quick: bool) -> list[dict]:
    c: list[dict] = []
    for K in (1, 8) if quick else (1, 2, 4, 8, 16, 32):
        if quick and K not in (1, ref_k):
            continue
        c.append({"name": f"truncated{ref_steps} K={K}", "sampler": "truncated", "steps": ref_steps, "K": K})
    t0 = ref_steps - 1  # the truncated chain's start time
    for n in (1, 5, 10) if quick else (1, 2, 3, 5, 8, 10):
        c.append({"name": f"ddim{n} mean K=1", "sampler": "ddim", "steps": n, "start": "mean", "K": 1})
        c.append({"name": f"dpmpp2m{n} mean K=1", "sampler": "dpmpp2m", "steps": n, "start": "mean", "K": 1})
        c.append(
            {
                "name": f"ddim{n} t_start={t0} mean K=1",
                "sampler": "ddim",
                "steps": n,
                "start": "mean",
                "t_start": t0,
                "K": 1,
            }
        )
        c.append(
            {
                "name": f"dpmpp2m{n} t_start={t0} mean K=1",
                "sampler": "dpmpp2m",
                "steps": n,
                "start": "mean",
                "t_start": t0,
                "K": 1,
            }
        )
    if not quick:
        for ts in sorted({max(1, t0 // 4), max(1, t0 // 2), min(T - 1, 2 * t0), min(T - 1, 4 * t0)} - {t0}):
            for n in (5, 10):
                c.append(
                    {
                        "name": f"ddim{n} t_start={ts} mean K=1",
                        "sampler": "ddim",
                        "steps": min(n, ts + 1),
                        "start": "mean",
                        "t_start": ts,
                        "K": 1,
                    }
                )
        c.append(
            {
                "name": f"ddim10 t_start={t0} noise K=8",
                "sampler": "ddim",
                "steps": 10,
                "start": "noise",
                "t_start": t0,
                "K": 8,
            }
        )
    c.append({"name": "ddim10 noise K=8", "sampler": "ddim", "steps": 10, "start": "noise", "K": 8})
    return c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--ckpt", default=None, help="checkpoint (default: best.ckpt, else last.ckpt)")
    ap.add_argument("--splits", default="val,test")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--bench", action="store_true", help="only the reference and the goal-1 sampler (what `make bench` reports)"
    )
    ap.add_argument(
        "--int8",
        action="store_true",
        help="also: the goal-1 sampler with a dynamically int8-quantised denoiser head; "
        "how many test predictions change and how far the probabilities move",
    )
    ap.add_argument(
        "--ref-steps",
        type=int,
        default=None,
        help="truncated-chain length of the reference (default: the run's eval.steps)",
    )
    ap.add_argument(
        "--ref-k", type=int, default=None, help="samples per image of the reference (default: eval.num_samples)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = Path(args.run)
    cfg, module, dm = load(run, args.ckpt)
    splits = args.splits.split(",")
    data = cached_features(run, module, dm, splits)
    e = cfg.eval
    T = module.schedule.num_timesteps
    ref_steps = args.ref_steps or (e.steps if e.sampler == "truncated" and e.steps else T)
    ref_k = args.ref_k or e.num_samples
    results = []
    few_spec = {
        "name": f"{FEWSTEP['sampler']}{FEWSTEP['steps']} t_start={ref_steps - 1} mean K=1",
        "K": 1,
        "start": "mean",
        "t_start": ref_steps - 1,
        **FEWSTEP,
    }
    specs = candidates(T, ref_steps, ref_k, args.quick)
    if args.bench:
        specs = [
            {"name": f"truncated{ref_steps} K={ref_k}", "sampler": "truncated", "steps": ref_steps, "K": ref_k},
            few_spec,
        ]
    for spec in specs:
        row = {"name": spec["name"], "spec": spec, "nfe": spec.get("steps", T) * spec.get("K", 1)}
        for s in splits:
            t0 = time.perf_counter()
            sc = score(run_sampler(module, data[s], spec, e.sample_seed), data[s]["label"], e.temperature)
            row[s] = {"acc": sc["acc"], "f1": sc["f1"], "s": round(time.perf_counter() - t0, 3)}
            row[s + "_pred"] = sc["pred"]
        results.append(row)
        log(f"{spec['name']:<45} " + "  ".join(f"{s} acc {row[s]['acc']:.4f} f1 {row[s]['f1']:.4f}" for s in splits))
    ref_name = f"truncated{ref_steps} K={ref_k}"
    ref = next(r for r in results if r["name"] == ref_name)
    for r in results:
        for s in splits:
            r[s]["acc_delta_pts"] = round(100 * (r[s]["acc"] - ref[s]["acc"]), 2)
            r[s]["f1_delta_pts"] = round(100 * (r[s]["f1"] - ref[s]["f1"]), 2)
            r[s]["agree_with_ref"] = float((r[s + "_pred"] == ref[s + "_pred"]).float().mean())
    for r in results:
        for s in splits:
            del r[s + "_pred"]
    summary = {"run": str(run), "T": T, "reference": ref_name, "results": results}
    few = next((r for r in results if r["name"] == few_spec["name"]), None)
    if few is not None:
        summary["fewstep_vs_reference"] = {
            "name": few["name"],
            **{f"{s}_{k}": few[s][k] for s in splits for k in ("acc_delta_pts", "f1_delta_pts", "agree_with_ref")},
        }
    if args.int8:
        import copy

        q = copy.deepcopy(module)
        q.model.denoiser = torch.ao.quantization.quantize_dynamic(
            q.model.denoiser, {torch.nn.Linear}, dtype=torch.qint8
        )
        summary["int8_head"] = {}
        for s in splits:
            a = score(run_sampler(module, data[s], few_spec, e.sample_seed), data[s]["label"], e.temperature)
            b = score(run_sampler(q, data[s], few_spec, e.sample_seed), data[s]["label"], e.temperature)
            summary["int8_head"][s] = {
                "sampler": few_spec["name"],
                "fp32_acc": a["acc"],
                "int8_acc": b["acc"],
                "fp32_f1": a["f1"],
                "int8_f1": b["f1"],
                "predictions_changed": int((a["pred"] != b["pred"]).sum()),
                "images": len(data[s]["id"]),
                "max_abs_prob_change": float((a["probs"] - b["probs"]).abs().max()),
                "mean_abs_prob_change": float((a["probs"] - b["probs"]).abs().mean()),
            }
            log(f"int8 head on {s}: {summary['int8_head'][s]}")
    out_name = "sampler_study_bench.json" if args.bench else "sampler_study.json"
    (run / out_name).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
