"""The ONNX Runtime backend against the PyTorch one on a whole test split (issue 27's rule, goals 1 and 3).

A trained run (default: `make demo`'s ``runs/demo``) is exported with its ONNX graphs into a temporary
folder (``export_model(..., onnx=True, onnx_batch=--onnx-batch)``), loaded twice with
:meth:`diffmic.inference.Predictor.load` (``backend="torch"`` and ``backend="onnx"``, both on the CPU),
and both predict every test image the run's ``predictions.csv`` lists, ``--batch`` images at a time, in
the same order. Reported: ``classes_changed`` (images whose predicted class differs),
``prob_max_abs_diff`` / ``prob_mean_abs_diff`` (the calibrated class probabilities), the accuracy of each,
and the throughput of each (images per second, the whole predict call: decode, networks, sampler,
trust outputs) with ``throughput_speedup`` = ONNX / PyTorch. The two backends alternate batch by batch,
so a busy machine slows both alike.

Usage:  python benchmarks/backend_agreement.py [--run runs/demo] [--limit N] [--batch 32]
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
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
from _common import ForeignLoad, emit, log, machine_info  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "runs" / "demo"))
    ap.add_argument("--data-root", default=None, help="the images' folder (default: the run's data.root)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N test images (default: all)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--onnx-batch", type=int, default=8, help="the encoder graph's fixed batch size")
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
        onnx_pred = Predictor.load(folder, backend="onnx")
        probs: dict[str, list[np.ndarray]] = {"torch": [], "onnx": []}
        secs = {"torch": 0.0, "onnx": 0.0}
        load = ForeignLoad()
        for i in range(0, len(paths), args.batch):
            chunk = paths[i : i + args.batch]
            for name, pred in (("torch", torch_pred), ("onnx", onnx_pred)):
                s0 = time.perf_counter()
                out = pred.predict(chunk, batch_size=args.batch)
                secs[name] += time.perf_counter() - s0
                probs[name].append(np.array([[r.probs[n] for n in names] for r in out]))
            if (i // args.batch) % 10 == 0:
                log(f"[backends] {i + len(chunk)}/{len(paths)} images")
        foreign = load.share()
    p_t, p_o = np.concatenate(probs["torch"]), np.concatenate(probs["onnx"])
    diff = np.abs(p_t - p_o)
    changed = int((p_t.argmax(1) != p_o.argmax(1)).sum())
    ips = {k: len(paths) / v for k, v in secs.items()}
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
            },
            "classes_changed": changed,
            "prob_max_abs_diff": float(diff.max()),
            "prob_mean_abs_diff": float(diff.mean()),
            "acc": {k: float((v.argmax(1) == labels).mean()) for k, v in (("torch", p_t), ("onnx", p_o))},
            "images_per_s": {k: round(v, 2) for k, v in ips.items()},
            "throughput_speedup": round(ips["onnx"] / ips["torch"], 3),
            "foreign_cpu_share": foreign,
            "contended": foreign is not None and foreign > 0.1,
            "machine": machine_info(torch.device("cpu")),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
