"""Why does the diffusion read-out track its DCG prior? Diagnostics on the validation split.

For a trained diffusion run (C2 / full), on the validation split (never the test split; `--split train`
shows the training images, where the denoiser learnt what it does):

* ``readout``: accuracy / macro-F1 of the diffusion read-out and of the prior alone, the share of
  images where the two argmaxes differ, and the mean L1 distance between the read-out
  probabilities and the prior, for K = 1 and K = 8 samples (the run's sampler) and for the
  deterministic read-out from the prior mean (``readout_point``: ``eval.point_steps`` calls, 5 if unset);
* ``prior_out_of_fold`` (runs with ``train.prior_folds``): the accuracy of the priors the denoiser
  trained on, each image's from the fold DCG that did not see it (meaningful on ``--split train``),
  and ``readout_point_out_of_fold``: the deterministic read-out conditioned on them (how many of the
  wrong ones it corrects);
* ``eps_mse``: the denoiser's noise-prediction MSE per timestep bucket on validation images, with
  the true label y0, against two controls at the same (t, ε): (a) ρ(x) of another image of the
  batch (features shuffled: does the image embedding matter?) and (b) the prior of another image
  (guidance and μ shuffled). MSE of the trivial ε̂ = 0 is 1.

    python benchmarks/prior_tracking.py --run RUN [--ckpt best|last|FILE] [--split val|train] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch


@torch.no_grad()
def diagnose(run: Path, buckets: int = 5, batch_size: int = 64, ckpt: str | None = None, split: str = "val") -> dict:
    from torchmetrics.functional.classification import multiclass_f1_score

    from diffmic.config import load_config
    from diffmic.diffusion.process import q_sample
    from diffmic.diffusion.reverse import reverse_sample
    from diffmic.metrics import readout
    from diffmic.training.checkpoint import load_module
    from diffmic.training.crossfit import fold_of, out_of_fold_guidance
    from diffmic.training.run import build_datamodule, resolve_checkpoint
    from diffmic.training.step import make_fold_dcgs

    cfg = load_config(run / "config.yaml")
    dm = build_datamodule(cfg)
    dm.setup("fit")
    ds = dm.get_dataset(split)
    ckpt_path = resolve_checkpoint(run, ckpt)
    raw = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    trained = {"checkpoint": ckpt_path.name, "epoch": raw.get("epoch"), "global_step": raw.get("global_step")}
    module = load_module(ckpt_path).eval()
    model, sched, e = module.model, module.schedule, cfg.eval
    # train.prior_folds >= 2: the fold DCGs, whose out-of-fold priors the denoiser trained on
    fold_dcgs = make_fold_dcgs(model, cfg.train)
    if fold_dcgs is not None:
        fold_state = {k[len("fold_dcgs.") :]: v for k, v in raw["state_dict"].items() if k.startswith("fold_dcgs.")}
        fold_dcgs.load_state_dict(fold_state, strict=True)
        fold_dcgs.eval()
    del raw
    if not model.uses_diffusion:
        raise SystemExit(f"{run}: variant {model.variant} has no diffusion")
    C, T = model.num_classes, sched.num_timesteps
    items = [ds[i] for i in range(len(ds))]
    labels = torch.tensor([int(it["label"]) for it in items])
    res: dict = {"run": str(run), "split": split, "images": len(items), "variant": model.variant, **trained}
    probs_k: dict[int, list] = {1: [], 8: []}
    probs_point: list = []  # the deterministic read-out from mu over the window (eval.point_steps, 5 if unset)
    priors = []
    oof_priors = []  # with fold DCGs: image i's prior from the DCG of its fold (did not train on it)
    oof_point = []  # the point read-out from those priors
    mse = {name: torch.zeros(buckets) for name in ("true", "shuffled_image", "shuffled_prior")}
    counts = torch.zeros(buckets)
    gen = torch.Generator().manual_seed(0)
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        x = torch.stack([it["image"] for it in chunk])
        ids = [it["id"] for it in chunk]
        y = labels[s : s + batch_size]
        for K in probs_k:
            out = reverse_sample(
                model,
                sched,
                x,
                **{**e.reverse_kwargs(), "num_samples": K, "point_steps": (e.point_steps or 5) if K == 1 else 0},
                ids=ids,
            )
            probs_k[K].append(readout(out.y0, e.aggregate, e.temperature).probs)
            if out.point is not None:
                probs_point.append(readout(out.y0, e.aggregate, e.temperature, point=out.point).probs)
        g = model.guide(x)
        pri = model.priors(g, x.shape[0], x.device, x.dtype)
        priors.append(pri.fused)
        if fold_dcgs is not None:
            folds = fold_of(ids, len(fold_dcgs), cfg.run.seed)
            oof_priors.append(
                model.priors(out_of_fold_guidance(fold_dcgs, x, folds), x.shape[0], x.device, x.dtype).fused
            )
            # the deterministic read-out conditioned on those out-of-fold priors: on the training
            # images, does the denoiser correct the priors it was trained to correct?
            out = reverse_sample(
                model,
                sched,
                x,
                **{**e.reverse_kwargs(), "num_samples": 1, "point_steps": e.point_steps or 5},
                ids=ids,
                guide=functools.partial(out_of_fold_guidance, fold_dcgs, folds=folds),
            )
            oof_point.append(readout(out.y0, e.aggregate, e.temperature, point=out.point).probs)
        feat = model.encode(x)
        y0 = torch.nn.functional.one_hot(y, C).float()
        perm = torch.roll(torch.arange(x.shape[0]), 1)
        for b in range(buckets):
            lo, hi = b * T // buckets, (b + 1) * T // buckets
            t = torch.randint(lo, hi, (x.shape[0],), generator=gen)
            eps = torch.randn(x.shape[0], C, generator=gen)
            guid = (lambda v: v) if model.uses_guidance else (lambda v: None)
            y_t = q_sample(sched, y0, t, pri.fused, eps)
            mse["true"][b] += ((model.eps(feat, y_t, t, guid(pri.fused)) - eps) ** 2).mean(1).sum()
            mse["shuffled_image"][b] += ((model.eps(feat[perm], y_t, t, guid(pri.fused)) - eps) ** 2).mean(1).sum()
            y_t2 = q_sample(sched, y0, t, pri.fused[perm], eps)
            mse["shuffled_prior"][b] += ((model.eps(feat, y_t2, t, guid(pri.fused[perm])) - eps) ** 2).mean(1).sum()
            counts[b] += x.shape[0]
    prior = torch.cat(priors)

    def score(p):
        pred = p.argmax(1)
        return {
            "acc": round(float((pred == labels).float().mean()), 4),
            "f1": round(float(multiclass_f1_score(pred, labels, num_classes=C, average="macro")), 4),
        }

    res["prior"] = score(prior)
    if oof_priors:  # on --split train: the priors the denoiser trained on, against the model's own DCG
        oof = torch.cat(oof_priors)
        res["prior_out_of_fold"] = {
            **score(oof),
            "argmax_differs_from_prior": round(float((oof.argmax(1) != prior.argmax(1)).float().mean()), 4),
        }
        p = torch.cat(oof_point)
        wrong = oof.argmax(1) != labels
        res["readout_point_out_of_fold"] = {
            **score(p),
            "argmax_differs_from_its_prior": round(float((p.argmax(1) != oof.argmax(1)).float().mean()), 4),
            "mean_L1_to_its_prior": round(float((p - oof).abs().sum(1).mean()), 4),
            # of the images whose out-of-fold prior is wrong, the share the read-out gets right
            "corrects_wrong_priors": round(float((p.argmax(1)[wrong] == labels[wrong]).float().mean()), 4)
            if bool(wrong.any())
            else None,
        }
    for name, ps in [*((f"readout_K{K}", v) for K, v in probs_k.items()), ("readout_point", probs_point)]:
        p = torch.cat(ps)
        res[name] = {
            **score(p),
            "argmax_differs_from_prior": round(float((p.argmax(1) != prior.argmax(1)).float().mean()), 4),
            "mean_L1_to_prior": round(float((p - prior).abs().sum(1).mean()), 4),
        }
    res["eps_mse_by_t_bucket"] = {
        "t_ranges": [[b * T // buckets, (b + 1) * T // buckets - 1] for b in range(buckets)],
        **{k: [round(float(v), 4) for v in (m / counts)] for k, m in mse.items()},
    }
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--ckpt",
        help="checkpoint file, or 'best' / 'last' in the run's checkpoints/ (default: best, else last)",
    )
    p.add_argument(
        "--split",
        choices=("val", "train"),
        default="val",
        help="images to diagnose (train: with the training augmentation; shows what the denoiser learnt to copy)",
    )
    a = p.parse_args(argv)
    ckpt = a.ckpt
    if ckpt in ("best", "last"):
        ckpt = str(a.run / "checkpoints" / f"{ckpt}.ckpt")
    res = diagnose(a.run, ckpt=ckpt, split=a.split)
    line = json.dumps(res)
    print(line)
    if a.json:
        a.json.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
