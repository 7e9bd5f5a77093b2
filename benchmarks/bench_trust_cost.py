"""What the trust outputs add to one image's latency (goal 5 of issue 27).

One trained model (default: `make demo`'s run folder ``runs/demo``) is loaded once through the serving
path (:meth:`diffmic.inference.Predictor.load`); ``--images`` test images are decoded once and then
classified one at a time (batch 1), ``--repeats`` rounds, interleaving the settings below, and the median
time per image is reported for each part of one prediction:

* ``networks``: the DCG and ρ(x) passes (``model.guide`` + ``model.encode``), once per image;
* ``sampler_K``: the reverse chains of the K samples (``eval.num_samples``, the run's sampler and steps)
  plus the point read-out (``eval.point_steps``), with the networks' outputs reused (``reverse_sample``
  through a stand-in whose ``guide`` / ``encode`` return them);
* ``sampler_1``: the same with one sample (K = 1);
* ``calibration``: the calibrated probabilities, the fitted referral, the conformal set and the
  out-of-distribution score and flag (``trust.evaluate.predict_trust`` without the samples);
* ``ttest``: the CARD t-test over the K samples (``trust.uncertainty.card_uncertainty``);
* ``predict``: the whole ``Predictor.predict_tensor`` (read-out, trust outputs, the result objects);
* ``sampler_fast`` / ``predict_fast``: the same on the fast path (``diffmic predict --fast``,
  :meth:`Predictor.set_fast`): the point read-out alone, no K chains; the JSON says whether the fast
  path changed any class or probability (it must not) and its speed-up on the whole prediction.

Times are per image at batch 1, wall clock, on the device the Predictor picks (CPU here). The last stdout
line is one JSON object; ``share_of_predict`` puts each part against the whole.

Usage:  python benchmarks/bench_trust_cost.py [--model runs/demo] [--images 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import ForeignLoad, emit, log, machine_info, wait_for_quiet  # noqa: E402


def _test_images(run: Path, root: Path, n: int) -> list[Path]:
    """The first ``n`` test images of the run's ``predictions.csv`` (HAM10000 layout: ``images/<id>.jpg``)."""
    with (run / "predictions.csv").open(newline="") as f:
        ids = [row["id"] for row, _ in zip(csv.DictReader(f), range(n))]
    paths = [root / "images" / f"{i}.jpg" for i in ids]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"test images not found (first: {missing[0]}); pass --data-root")
    return paths


class _Precomputed:
    """The network with its DCG and ρ(x) outputs for one image fixed: ``reverse_sample`` through it
    runs only the sampler (the denoiser calls, the noise, the point read-out)."""

    def __init__(self, model, guidance, feat) -> None:
        self._model, self._guidance, self._feat = model, guidance, feat

    def guide(self, x):
        return self._guidance

    def encode(self, x):
        return self._feat

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "runs" / "demo"), help="a trained run folder (default runs/demo)")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "ham10000"))
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this long for a quiet CPU first")
    args = ap.parse_args(argv)

    from diffmic.diffusion.reverse import reverse_sample
    from diffmic.inference import Predictor
    from diffmic.inference.predictor import FastPathError
    from diffmic.metrics import readout
    from diffmic.trust.evaluate import predict_trust
    from diffmic.trust.ood import OODInputs
    from diffmic.trust.uncertainty import card_uncertainty

    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    run = Path(args.model)
    pred = Predictor.load(run)
    m, e = pred.module, pred.cfg.eval
    if not m.model.uses_diffusion:
        raise SystemExit(f"{run}: variant {m.model.variant!r} does not sample; this benchmark times the diffusion")
    calib = getattr(m, "calibration", None)
    paths = _test_images(run, Path(args.data_root), args.images)
    x_all, ids, keys = pred._load_images_seeded(paths)
    kw = e.reverse_kwargs()
    K = int(e.num_samples)
    parts: dict[str, list[float]] = {k: [] for k in ("networks", "sampler_K", "sampler_1", "calibration", "ttest")}
    parts["predict"] = []
    try:
        pred.set_fast(True)
        pred.set_fast(False)
        fast_refused = None
    except FastPathError as exc:  # a model that needs its samples: the fast path is not timed
        fast_refused = str(exc)
    if fast_refused is None:
        parts["sampler_fast"], parts["predict_fast"] = [], []
    fast_moved = {"classes_changed": 0, "prob_max_abs_diff": 0.0}

    def clock(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    with torch.inference_mode():  # warm-up: first calls allocate and pick kernels
        x = x_all[:1].to(pred.device)
        reverse_sample(m.model, m.schedule, x, **kw, ids=[keys[0]])
        pred.predict_tensor(x, [ids[0]], [keys[0]])
    load = ForeignLoad()
    with torch.inference_mode():
        for rnd in range(max(1, args.repeats)):
            for i in range(len(paths)):
                x = x_all[i : i + 1].to(pred.device)
                (g, feat), t_net = clock(lambda: (m.model.guide(x), m.model.encode(x)))
                net = _Precomputed(m.model, g, feat)  # the sampler alone: the networks' outputs reused
                out, t_k = clock(lambda: reverse_sample(net, m.schedule, x, **kw, ids=[keys[i]]))
                kw1 = {**kw, "num_samples": 1}
                _, t_1 = clock(lambda: reverse_sample(net, m.schedule, x, **kw1, ids=[keys[i]]))
                r = readout(out.y0, e.aggregate, e.temperature, point=out.point)
                ood = OODInputs(g.z_fused if g is not None else None, out.feat, r.spread)
                _, t_cal = clock(lambda: predict_trust(r.probs, None, calib, ids=[ids[i]], ood_inputs=ood))
                samples = r.samples
                assert samples is not None  # a diffusion read-out keeps its K samples
                _, t_tt = clock(lambda: card_uncertainty(samples.detach().cpu()))
                res, t_pred = clock(lambda: pred.predict_tensor(x, [ids[i]], [keys[i]]))
                for k, v in zip(parts, (t_net, t_k, t_1, t_cal, t_tt, t_pred)):
                    parts[k].append(v)
                if fast_refused is None:
                    kwf = {**kw, "draw_samples": False}
                    _, t_f = clock(lambda: reverse_sample(net, m.schedule, x, **kwf, ids=[keys[i]]))
                    pred.set_fast(True)
                    fres, t_pf = clock(lambda: pred.predict_tensor(x, [ids[i]], [keys[i]]))
                    pred.set_fast(False)
                    parts["sampler_fast"].append(t_f)
                    parts["predict_fast"].append(t_pf)
                    fast_moved["classes_changed"] += int(fres[0].label != res[0].label) if rnd == 0 else 0
                    diff = max(abs(fres[0].probs[c] - res[0].probs[c]) for c in res[0].probs)
                    fast_moved["prob_max_abs_diff"] = max(fast_moved["prob_max_abs_diff"], diff)
            log(f"[trust-cost] round {rnd + 1}: predict median {statistics.median(parts['predict']):.4f} s/image")
    foreign = load.share()
    med = {k: statistics.median(v) for k, v in parts.items()}
    cost = {
        "networks_s": med["networks"],
        "sampler_K_s": med["sampler_K"],
        "sampler_1_s": med["sampler_1"],
        "calibration_conformal_ood_s": med["calibration"],
        "ttest_s": med["ttest"],
        "predict_s": med["predict"],
    }
    if fast_refused is None:
        cost["sampler_fast_s"] = med["sampler_fast"]
        cost["predict_fast_s"] = med["predict_fast"]
    emit(
        {
            "benchmark": "trust_cost",
            "setting": {
                "model": str(run),
                "images": len(paths),
                "repeats": args.repeats,
                "batch": 1,
                "eval": {k: v for k, v in kw.items()},
                "num_samples": K,
                "calibrated": calib is not None,
                "ood_score": (calib or {}).get("ood", {}).get("score") if calib else None,
                "timing": "median over images x repeats of the wall time per image, parts interleaved",
            },
            "per_image_s": {k: round(v, 5) for k, v in cost.items()},
            "share_of_predict": {k: round(v / cost["predict_s"], 3) for k, v in cost.items() if k != "predict_s"},
            "sampler_K_over_1": round(cost["sampler_K_s"] / cost["sampler_1_s"], 2) if cost["sampler_1_s"] else None,
            "fast_path": (
                {"refused": fast_refused}
                if fast_refused is not None
                else {
                    "speedup": round(cost["predict_s"] / cost["predict_fast_s"], 2),
                    "images": len(paths),
                    **fast_moved,
                }
            ),
            "foreign_cpu_share": foreign,
            "contended": foreign is not None and foreign > 0.1,
            "waited_for_quiet": quiet,
            "machine": machine_info(pred.device),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
