"""Which calibrator rule holds across runs (issue 25 goal 2): each rule fitted on a run's validation
split, scored on its test split.

For every trained run folder given (``diffmic test`` done: its ``predictions.csv`` holds the test
images' unscaled probabilities, ``unscaled_p_<class>``, and their labels), the validation split's
unscaled probabilities are collected once with the run's own evaluation settings (the test-time
sampler, as ``diffmic calibrate`` does). Then every calibrator of ``eval.calibrator`` (the fixed ones
and the two rules that choose among them on validation, ``auto`` and ``auto_nll``) is fitted on the
validation probabilities and applied to the test probabilities; the test ECE, classwise ECE, NLL,
Brier score and accuracy of each are reported, with the choice each rule made. Nothing is written
into the run folders.

Usage:  python benchmarks/calibrator_choice.py RUN [RUN ...]
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import ForeignLoad, emit, log  # noqa: E402

RULES = ("auto", "auto_nll")


def _test_probs(run: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images' unscaled probabilities and labels from ``predictions.csv``."""
    with (run / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{run}/predictions.csv has no rows")
    if "set" in rows[0]:  # a calibrated test: p_ are calibrated, unscaled_p_ are the model's own
        cols = [f"unscaled_p_{n}" for n in names]
    else:
        cols = [f"p_{n}" for n in names]
    p = torch.tensor([[float(r[c]) for c in cols] for r in rows], dtype=torch.float64)
    y = torch.tensor([int(r["label"]) for r in rows])
    return p, y


def _val_probs(run: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from diffmic.config import load_config
    from diffmic.devices import default_device
    from diffmic.training.checkpoint import load_module
    from diffmic.training.loading import resolve_checkpoint
    from diffmic.training.run import build_datamodule
    from diffmic.trust.evaluate import collect_probs

    cfg = load_config(run / "config.yaml", [])
    module = load_module(resolve_checkpoint(run, None), overrides={"eval": cfg.to_dict()["eval"]})
    dm = build_datamodule(cfg)
    dm.setup("validate")
    module.to(default_device())
    torch.manual_seed(cfg.run.seed)
    with torch.no_grad():  # not inference_mode: the calibrators are fitted with autograd on these
        p, y, _ = collect_probs(module, dm.val_dataloader())
    return p, y, list(module.class_names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args(argv)

    from diffmic.trust.calibration import FIXED_CALIBRATORS, apply_calibration, fit_calibration, scores

    load = ForeignLoad()
    t0 = time.perf_counter()
    out: dict[str, dict] = {}
    for r in args.runs:
        run = Path(r)
        pv, yv, names = _val_probs(run)
        pt, yt = _test_probs(run, names)
        res: dict[str, Any] = {"val_images": int(yv.numel()), "test_images": int(yt.numel())}
        res["none"] = scores(pt, yt)
        for kind in (*FIXED_CALIBRATORS, *RULES):
            t1 = time.perf_counter()
            fitted = fit_calibration(pv, yv, kind)
            s = scores(apply_calibration(pt, fitted), yt, pt)
            s["fit_s"] = round(time.perf_counter() - t1, 2)
            if kind in RULES:
                s["chosen"] = fitted["auto"]["chosen"]
            res[kind] = s
        log(
            f"[calibrators] {run}: auto -> {res['auto']['chosen']} ECE {res['auto']['ece']:.4f}; "
            f"auto_nll -> {res['auto_nll']['chosen']} ECE {res['auto_nll']['ece']:.4f}"
        )
        out[str(run)] = res
    lines = [
        "| run | val / test images | none | temperature | auto: chosen, ECE | auto_nll: chosen, ECE | "
        "auto_nll classwise ECE | auto_nll accuracy change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, res in out.items():
        lines.append(
            f"| {name} | {res['val_images']} / {res['test_images']} | {res['none']['ece']:.4f} | "
            f"{res['temperature']['ece']:.4f} | {res['auto']['chosen']}, {res['auto']['ece']:.4f} | "
            f"{res['auto_nll']['chosen']}, {res['auto_nll']['ece']:.4f} | {res['auto_nll']['classwise_ece']:.4f} | "
            f"{res['auto_nll']['acc'] - res['none']['acc']:+.4f} |"
        )
    table = "\n".join(lines)
    print(table)
    closing = load.record(torch.device("cpu"))
    emit(
        {
            "benchmark": "calibrator_choice",
            "runs": out,
            "wall_s": round(time.perf_counter() - t0, 1),
            **closing,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
