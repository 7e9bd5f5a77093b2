"""Which out-of-distribution score tells HAM10000 images from images unlike them? (issue 25 §3)

    python benchmarks/ood_study.py --run RUN --work /tmp/ood_work --json benchmarks/results/.../ood_study.json

For a trained HAM10000 run, every candidate score of ``diffmic.trust.ood`` (energy, maximum logit
and maximum softmax probability of the DCG's fused logits, Mahalanobis distance on ρ(x), spread of
the K reverse samples) plus the baseline "1 − calibrated confidence" of the run's read-out, from
one evaluation pass per image (``DiffMICModule._eval_batch``, the path ``diffmic test`` takes):

* the Mahalanobis class means and shared covariance on the training split (no augmentation);
* each score's threshold on the validation split at the false flag rate (default 5 %, the
  library's :func:`~diffmic.trust.ood.fit_threshold`);
* in-distribution: the HAM10000 test split; out-of-distribution: BreastMNIST ultrasound images
  (``--breastmnist``, written to PNG under ``--work``), the APTOS 2019 fundus images
  (``--aptos``), and generated non-dermoscopy images (uniform noise, flat colours, synthetic
  chest-X-ray-like grey images; seeded), each read like ``diffmic predict`` reads a file;
* per score: AUROC (scikit-learn) of test against each OOD set and all of them, the false flag
  rate on the test split, and the share of each OOD set flagged at the validation threshold.

Per-image scores are cached in ``--work/scores.pt`` (delete it to recompute).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffmic.config import load_config
from diffmic.data.datasets import CachedImageDataset, ImagePathsDataset
from diffmic.data.transforms import build_transform
from diffmic.training.checkpoint import load_module
from diffmic.training.run import build_datamodule, resolve_checkpoint
from diffmic.trust.calibration import apply_calibration
from diffmic.trust.ood import (
    CANDIDATES,
    OODInputs,
    candidate_scores,
    fit_mahalanobis,
    fit_threshold,
    flags,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_breastmnist(npz: Path, out: Path, n: int) -> list[Path]:
    d = np.load(npz)
    imgs = np.concatenate([d["test_images"], d["val_images"], d["train_images"]])[:n]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(imgs):
        p = out / f"breastmnist_{i:04d}.png"
        if not p.is_file():
            Image.fromarray(a).save(p)
        paths.append(p)
    return paths


def write_generated(out: Path, n: int, seed: int = 0) -> dict[str, list[Path]]:
    """``n`` each of: uniform RGB noise, flat colours, chest-X-ray-like grey images (dark lung
    fields in a bright body, a spine, rib arcs, blur and noise), 256 x 256."""
    from PIL import ImageFilter

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    sets: dict[str, list[Path]] = {"noise": [], "flat": [], "xray": []}
    yy, xx = np.mgrid[0:256, 0:256] / 255.0
    for i in range(n):
        noise = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        flat = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (256, 256, 3)).copy()
        body = 0.75 - 0.5 * ((xx - 0.5) ** 2 * 2.5 + (yy - 0.55) ** 2 * 1.2)
        for cx in (0.32 + rng.normal(0, 0.02), 0.68 + rng.normal(0, 0.02)):
            lung = ((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
            body = np.where(lung, body * rng.uniform(0.25, 0.45), body)
        ribs = 0.08 * (np.sin((yy * 22 + np.abs(xx - 0.5) * 6) * np.pi) > 0.6)
        spine = 0.25 * np.exp(-(((xx - 0.5) / 0.04) ** 2))
        grey = np.clip(body + ribs + spine + rng.normal(0, 0.03, body.shape), 0, 1)
        xray = Image.fromarray((grey * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
        for name, img in (("noise", Image.fromarray(noise)), ("flat", Image.fromarray(flat)), ("xray", xray)):
            p = out / f"{name}_{i:03d}.png"
            if not p.is_file():
                img.save(p)
            sets[name].append(p)
    return sets


@torch.no_grad()
def evaluate(module, dataset, ids: list[str], batch_size: int, label: str) -> dict:
    """Per image: OOD inputs and unscaled probabilities, from one `_eval_batch` pass."""
    parts, probs = [], []
    t0 = time.time()
    for s in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(s, min(s + batch_size, len(dataset)))]
        x = torch.stack([it["image"] for it in items])
        p, _, _, extra = module._eval_batch({"image": x, "id": ids[s : s + len(items)]}, "test")
        parts.append(extra["ood"].detached())
        probs.append(p.double())
        print(f"  {label}: {s + len(items)}/{len(dataset)} images, {time.time() - t0:.0f} s", flush=True)
    inp = OODInputs.concat(parts)
    return {"logits": inp.logits, "feat": inp.feat, "spread": inp.spread, "probs": torch.cat(probs)}


@torch.no_grad()
def train_features(module, dataset, batch_size: int) -> torch.Tensor:
    feats = []
    t0 = time.time()
    for s in range(0, len(dataset), batch_size):
        x = torch.stack([dataset[i]["image"] for i in range(s, min(s + batch_size, len(dataset)))])
        feats.append(module.model.encode(x).double())
        if (s // batch_size) % 20 == 0:
            print(f"  train features: {s + len(x)}/{len(dataset)}, {time.time() - t0:.0f} s", flush=True)
    return torch.cat(feats)


def pixel_key(x: torch.Tensor) -> str:  # as diffmic.inference.predictor.pixel_key (noise seed of a file)
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--work", default="/tmp/ood_work")
    ap.add_argument("--json", default=None)
    ap.add_argument("--breastmnist", default=str(SHARED / "breastmnist" / "breastmnist.npz"))
    ap.add_argument("--aptos", default=str(SHARED / "aptos2019" / "train_images"))
    ap.add_argument("--n-breastmnist", type=int, default=300)
    ap.add_argument("--n-generated", type=int, default=50)
    ap.add_argument("--rate", type=float, default=0.05, help="false flag rate the thresholds are fitted for")
    ap.add_argument("--limit", type=int, default=None, help="at most this many images per split (a quick check)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    run, work = Path(args.run), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(run / "config.yaml", None)
    ckpt = resolve_checkpoint(run, None)
    module = load_module(ckpt, overrides={"eval": cfg.to_dict()["eval"]}).eval()
    torch.manual_seed(cfg.run.seed)
    ood_sets = {"breastmnist": write_breastmnist(Path(args.breastmnist), work / "breastmnist", args.n_breastmnist)}
    ood_sets["aptos"] = sorted(Path(args.aptos).glob("*.png"))
    ood_sets.update(write_generated(work / "generated", args.n_generated))
    cache = work / "scores.pt"
    if cache.is_file():
        data = torch.load(cache, weights_only=True)
    else:
        dm = build_datamodule(cfg)
        dm.setup(None)
        lim = args.limit
        data = {}
        tr = dm.get_dataset("train")
        train_eval = CachedImageDataset(
            tr.images,
            tr.rows[:lim],
            tr.labels[:lim],
            tr.ids[:lim],
            build_transform(train=False, in_chans=cfg.data.in_chans),
        )
        data["train_feat"] = train_features(module, train_eval, args.batch_size)
        data["train_labels"] = torch.as_tensor(train_eval.labels)
        for split in ("val", "test"):
            ds = dm.get_dataset(split)
            if lim:
                ds = CachedImageDataset(ds.images, ds.rows[:lim], ds.labels[:lim], ds.ids[:lim], ds.transform)
            data[split] = evaluate(module, ds, [str(i) for i in ds.ids], args.batch_size, split)
            data[split]["labels"] = torch.as_tensor(ds.labels)
        for name, paths in ood_sets.items():
            ood_ds = ImagePathsDataset(paths, image_size=cfg.data.image_size, in_chans=cfg.data.in_chans)
            keys = [pixel_key(ood_ds[i]["image"]) for i in range(len(ood_ds))]
            data[f"ood_{name}"] = evaluate(module, ood_ds, keys, args.batch_size, name)
        torch.save(data, cache)

    from sklearn.metrics import roc_auc_score

    maha = fit_mahalanobis(data["train_feat"], data["train_labels"])
    calib = getattr(module, "calibration", None)

    def scores(d: dict) -> dict[str, np.ndarray]:
        s = candidate_scores(OODInputs(d["logits"], d["feat"], d["spread"]), maha)
        if calib is not None:
            s["confidence"] = -apply_calibration(d["probs"], calib).max(-1).values
        else:
            s["confidence"] = -d["probs"].max(-1).values
        return {k: v.numpy() for k, v in s.items()}

    val, test = scores(data["val"]), scores(data["test"])
    ood = {k[4:]: scores(v) for k, v in data.items() if k.startswith("ood_")}
    names = [n for n in (*CANDIDATES, "confidence") if n in test]
    result: dict = {
        "run": str(run),
        "checkpoint": str(ckpt),
        "test_accuracy": float((data["test"]["probs"].argmax(-1) == data["test"]["labels"]).double().mean()),
        "false_flag_rate_asked": args.rate,
        "threshold_rule": "ceil((n+1)(1-rate))-th smallest validation score; flag when score > threshold",
        "mahalanobis": {
            "features": "rho(x) (ImageEmbedding output)",
            "fitted_on": "train (no augmentation)",
            "num_images": maha["num_images"],
            "dim": maha["dim"],
            "rank": maha["rank"],
            "ledoit_wolf_shrinkage": maha["shrinkage"],
        },
        "sizes": {
            "train": len(data["train_labels"]),
            "val": len(val[names[0]]),
            "test": len(test[names[0]]),
            **{k: len(v[names[0]]) for k, v in ood.items()},
        },
        "scores": {},
    }
    all_ood = {n: np.concatenate([ood[k][n] for k in ood]) for n in names}
    for n in names:
        thr = fit_threshold(torch.as_tensor(val[n]), args.rate)
        auroc: dict[str, float] = {}
        flagged: dict[str, float] = {}
        entry: dict[str, Any] = {
            "threshold": thr,
            "val_flagged": float(flags(torch.as_tensor(val[n]), thr).double().mean()),
            "test_false_flag_rate": float(flags(torch.as_tensor(test[n]), thr).double().mean()),
            "auroc": auroc,
            "flagged": flagged,
        }
        for k, v in [*ood.items(), ("all", {n: all_ood[n]})]:
            y = np.r_[np.zeros(len(test[n])), np.ones(len(v[n]))]
            auroc[k] = float(roc_auc_score(y, np.r_[test[n], v[n]]))
            flagged[k] = float(flags(torch.as_tensor(v[n]), thr).double().mean())
        # the mean AUROC over the OOD kinds (each kind weighs the same, whatever its size)
        entry["auroc_mean_over_sets"] = float(np.mean([auroc[k] for k in ood]))
        result["scores"][n] = entry
    ranked = sorted(names, key=lambda n: -result["scores"][n]["auroc_mean_over_sets"])
    result["ranking_by_mean_auroc"] = ranked
    print(json.dumps(result, indent=2))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
