"""The ONNX Runtime backend (and the other serving variants) against the PyTorch one on a whole test split
(issue 27's rule, goals 1 and 3).

A trained run (default: `make demo`'s ``runs/demo``) is exported with its ONNX graphs into a temporary
folder (``export_model(..., onnx=True, onnx_batch=--onnx-batch)``), loaded twice with
:meth:`diffmic.inference.Predictor.load` (``backend="torch"`` and ``backend="onnx"``, both on the CPU),
and both predict every test image the run's ``predictions.csv`` lists, ``--batch`` images at a time, in
the same order. Reported: ``classes_changed`` (images whose predicted class differs),
``prob_max_abs_diff`` / ``prob_mean_abs_diff`` (the calibrated class probabilities), the accuracy of each,
and the throughput of each (images per second, the whole predict call: decode, networks, sampler,
trust outputs) with ``throughput_speedup`` = ONNX / PyTorch. The two backends alternate batch by batch,
so a busy machine slows both alike.

``--variants`` adds further ways to serve the same model, each checked by the same rule against ``torch``
(``variants`` block of the JSON: classes changed, probability differences, accuracy, images/s, speed-up):

* ``onnx_fast`` / ``torch_fast``: the fast path (``Predictor.load(..., fast=True)``, no K samples);
* ``torch_cl``: the PyTorch network in channels-last memory format (fp32);
* ``torch_bf16_nets``: the DCG and ρ(x) passes under CPU bf16 autocast (oneDNN), the denoiser and the
  trust outputs in fp32;
* ``torch_bf16``: the whole prediction under bf16 autocast (the calibration stays float64).

Usage:  python benchmarks/backend_agreement.py [--run runs/demo] [--limit N] [--batch 32]
            [--variants onnx torch_cl torch_bf16_nets ...]
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import ForeignLoad, bf16_networks, emit, log  # noqa: E402

VARIANTS = ("onnx", "onnx_fast", "torch_fast", "torch_cl", "torch_bf16_nets", "torch_bf16")


def _variant(name: str, run: Path, folder: Path):
    """The Predictor of variant ``name`` and the context its predict calls run in."""
    from diffmic.inference import Predictor

    if name in ("onnx", "onnx_fast"):
        return Predictor.load(folder, backend="onnx", fast=name == "onnx_fast"), contextlib.nullcontext
    pred = Predictor.load(run, device="cpu", fast=name == "torch_fast")
    if name == "torch_cl":
        pred.module.model.to(memory_format=torch.channels_last)
    elif name == "torch_bf16_nets":
        bf16_networks(pred.module.model)
    elif name == "torch_bf16":
        return pred, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return pred, contextlib.nullcontext


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "runs" / "demo"))
    ap.add_argument("--data-root", default=None, help="the images' folder (default: the run's data.root)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N test images (default: all)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--onnx-batch", type=int, default=8, help="the encoder graph's fixed batch size")
    ap.add_argument("--variants", nargs="+", default=["onnx"], choices=VARIANTS, help="compared with torch")
    args = ap.parse_args(argv)

    from diffmic.inference import Predictor
    from diffmic.inference.export import export_model

    run = Path(args.run)
    with (run / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))[: args.limit]
    torch_pred = Predictor.load(run, device="cpu")
    root = Path(args.data_root) if args.data_root else Path(torch_pred.cfg.data.root)
    if not root.is_absolute() and not root.exists():
        root = ROOT / root
    paths = [root / "images" / f"{r['id']}.jpg" for r in rows]
    labels = np.array([int(r["label"]) for r in rows])
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} test images not found (first: {missing[0]}); pass --data-root")
    names = torch_pred.class_names
    with tempfile.TemporaryDirectory(prefix="diffmic-backends-") as tmp:
        folder = export_model(run=run, out=Path(tmp) / "model", onnx=True, onnx_batch=args.onnx_batch)
        runs = {"torch": (torch_pred, contextlib.nullcontext)}
        runs.update({v: _variant(v, run, folder) for v in dict.fromkeys(args.variants)})
        probs: dict[str, list[np.ndarray]] = {k: [] for k in runs}
        secs = {k: 0.0 for k in runs}
        load = ForeignLoad()
        for i in range(0, len(paths), args.batch):
            chunk = paths[i : i + args.batch]
            for name, (pred, ctx) in runs.items():
                s0 = time.perf_counter()
                with ctx():
                    out = pred.predict(chunk, batch_size=args.batch)
                secs[name] += time.perf_counter() - s0
                probs[name].append(np.array([[r.probs[n] for n in names] for r in out]))
            if (i // args.batch) % 10 == 0:
                log(f"[backends] {i + len(chunk)}/{len(paths)} images")
        closing = load.record(torch.device("cpu"))
    allp = {k: np.concatenate(v) for k, v in probs.items()}
    p_t = allp["torch"]
    ips = {k: len(paths) / v for k, v in secs.items()}
    variants = {}
    for k, p in allp.items():
        if k == "torch":
            continue
        d = np.abs(p_t - p)
        variants[k] = {
            "classes_changed": int((p_t.argmax(1) != p.argmax(1)).sum()),
            "prob_max_abs_diff": float(d.max()),
            "prob_mean_abs_diff": float(d.mean()),
            "acc": float((p.argmax(1) == labels).mean()),
            "images_per_s": round(ips[k], 2),
            "speedup": round(ips[k] / ips["torch"], 3),
        }
    main_v = "onnx" if "onnx" in variants else next(iter(variants))
    emit(
        {
            "benchmark": "backend_agreement",
            "setting": {
                "run": str(run),
                "images": len(paths),
                "batch": args.batch,
                "onnx_batch": args.onnx_batch,
                "eval": torch_pred.cfg.eval.reverse_kwargs(),
                "threads": torch.get_num_threads(),
                "variants": list(variants),
            },
            # the first keys compare `onnx` (else the first variant) with torch, as make bench reads them
            "compared": main_v,
            "classes_changed": variants[main_v]["classes_changed"],
            "prob_max_abs_diff": variants[main_v]["prob_max_abs_diff"],
            "prob_mean_abs_diff": variants[main_v]["prob_mean_abs_diff"],
            "acc": {"torch": float((p_t.argmax(1) == labels).mean()), main_v: variants[main_v]["acc"]},
            "images_per_s": {k: round(v, 2) for k, v in ips.items()},
            "throughput_speedup": variants[main_v]["speedup"],
            "variants": variants,
            **closing,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
