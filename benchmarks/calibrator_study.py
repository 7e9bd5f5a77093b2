"""Which calibrator, chosen on the validation split only (docs/uncertainty.md)?

    python benchmarks/calibrator_study.py --run runs/demo [--run runs/demo_basic ...] [--json out.json]

Per run: the unscaled validation probabilities of the run's test-time read-out (cached in
``<run>/val_probs.pt``), then a 5-fold cross-validation on the validation split alone: each
calibrator (``eval.calibrator``: temperature; temperature+isotonic) is fitted on four folds and
scored on the fifth (ECE with 15 bins, NLL, Brier of the pooled held-out folds), and the choice
``eval.calibrator=auto`` makes from it (the library's own rule).
The test split's figures (from ``predictions.csv``'s unscaled probabilities, calibrators fitted
on the whole validation split) are printed beside them for the record; they choose nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import torch

from diffmic.config import load_config
from diffmic.training.checkpoint import load_module
from diffmic.training.run import build_datamodule, resolve_checkpoint
from diffmic.trust.calibration import (
    AUTO_FOLDS,
    apply_calibration,
    calibration_summary,
    cross_validate_calibrators,
    fit_calibration,
)
from diffmic.trust.evaluate import collect_probs


def val_probs(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    cache = run / "val_probs.pt"
    if cache.is_file():
        d = torch.load(cache, weights_only=True)
        return d["probs"], d["labels"]
    cfg = load_config(run / "config.yaml", None)
    module = load_module(resolve_checkpoint(run, None), overrides={"eval": cfg.to_dict()["eval"]})
    dm = build_datamodule(cfg)
    dm.setup("validate")
    pl.seed_everything(cfg.run.seed, verbose=False)
    p, y, ids = collect_probs(module, dm.val_dataloader())
    torch.save({"probs": p, "labels": y, "ids": ids}, cache)
    return p, y


def test_probs(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open(run / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    pre = "unscaled_p_" if any(k.startswith("unscaled_p_") for k in rows[0]) else "p_"
    names = [k[len(pre) :] for k in rows[0] if k.startswith(pre)]
    p = torch.tensor([[float(r[pre + n]) for n in names] for r in rows], dtype=torch.float64)
    return p, torch.tensor([int(r["label"]) for r in rows])


def study(run: Path) -> dict:
    pv, yv = val_probs(run)
    pt, yt = test_probs(run)
    out: dict = {"run": str(run), "val_images": len(yv), "test_images": len(yt), "folds": AUTO_FOLDS}
    out["val_cv"] = {"unscaled": calibration_summary(pv, yv), **cross_validate_calibrators(pv, yv)}
    out["test"] = {"unscaled": calibration_summary(pt, yt)}
    for kind in ("temperature", "temperature+isotonic"):
        out["test"][kind] = calibration_summary(apply_calibration(pt, fit_calibration(pv, yv, kind)), yt)
    out["auto_chooses"] = fit_calibration(pv, yv, "auto")["auto"]["chosen"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="tested run folder (repeatable)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    res = [study(Path(r)) for r in args.run]
    for r in res:
        print(f"\n{r['run']}: {r['val_images']} val / {r['test_images']} test images")
        print(f"{'calibrator':24s} {'val-CV ECE':>10s} {'val-CV NLL':>10s} {'test ECE':>9s} {'test NLL':>9s}")
        for k in ("unscaled", "temperature", "temperature+isotonic"):
            v, t = r["val_cv"][k], r["test"][k]
            print(f"{k:24s} {v['ece']:10.4f} {v['nll']:10.4f} {t['ece']:9.4f} {t['nll']:9.4f}")
        print(f"eval.calibrator=auto chooses (validation only): {r['auto_chooses']}")
    text = json.dumps(res, indent=2)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
