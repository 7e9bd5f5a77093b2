"""The ``diffmic`` command: ``fit``, ``validate``, ``test``, ``predict`` and ``data check``.

Examples::

    diffmic fit --config ham10000 data.root=/data/HAM10000 run.dir=runs/ham
    diffmic fit --run runs/ham --resume
    diffmic test --run runs/ham eval.sampler=ddim eval.steps=10
    diffmic predict --run runs/ham lesion1.jpg folder/ --output preds.csv --explain explain/
    diffmic data check --config my_folder.yaml data.root=/data/my_images

Overrides are ``section.key=value`` (YAML values); unknown keys are errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffmic", description="DiffMIC: diffusion for medical image classification")
    sub = p.add_subparsers(dest="verb", required=True)

    f = sub.add_parser("fit", help="train a model (DCG warm-up, then joint diffusion training)")
    f.add_argument("--config", help="YAML file or shipped preset name (ham10000, aptos2019, ultrasound, cpu, demo_cpu, ...)")
    f.add_argument("--run", help="run folder (same as run.dir=...); with --resume, its config.yaml is used")
    f.add_argument("--resume", action="store_true", help="resume from <run>/checkpoints/last.ckpt")
    f.add_argument("overrides", nargs="*", help="section.key=value")

    for verb, text in (("validate", "evaluate on the validation split"), ("test", "evaluate on the test split")):
        v = sub.add_parser(verb, help=text)
        v.add_argument("--run", required=True, help="trained run folder")
        v.add_argument("--ckpt", help="checkpoint (default: <run>/checkpoints/best.ckpt)")
        v.add_argument("--config", help="config (default: <run>/config.yaml)")
        v.add_argument("overrides", nargs="*", help="eval.* / data.* overrides, e.g. eval.sampler=ddim eval.steps=10")

    pr = sub.add_parser("predict", help="classify image files or folders")
    pr.add_argument("--run", help="trained run folder")
    pr.add_argument("--ckpt", help="checkpoint (default: <run>/checkpoints/best.ckpt)")
    pr.add_argument("--output", help="CSV file for the predictions (default: print)")
    pr.add_argument("--explain", help="folder for per-image saliency/ROI PNGs")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("inputs", nargs="+", help="image files, folders, and eval.* overrides (key=value)")

    ex = sub.add_parser("experiment", help="run a grid of models x data sets x seeds from YAML, then tabulate")
    ex.add_argument("grid", help="grid YAML file (see diffmic.experiment)")
    ex.add_argument("--summary-only", action="store_true", help="only write the tables of the finished cells")
    ex.add_argument("--only", nargs="*", help="run only these models (the table covers all)")
    ex.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the paired CIs")

    d = sub.add_parser("data", help="data utilities")
    dsub = d.add_subparsers(dest="data_verb", required=True)
    dc = dsub.add_parser("check", help="validate a data set and print a summary")
    dc.add_argument("--config", help="YAML file or preset")
    dc.add_argument("overrides", nargs="*")
    return p


def _expand_inputs(items: list[str]) -> tuple[list[Path], list[str]]:
    images: list[Path] = []
    overrides: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"folder '{p}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            images.extend(found)
        elif "=" in item and not p.exists():
            overrides.append(item)
        elif p.exists():
            images.append(p)
        else:
            raise FileNotFoundError(f"input '{item}' does not exist")
    return images, overrides


def _fit(args) -> int:
    from diffmic.config import load_config
    from diffmic.training.run import fit

    overrides = list(args.overrides)
    config = args.config
    if args.run:
        if args.resume and not config:
            config = str(Path(args.run) / "config.yaml")
        overrides.append(f"run.dir={args.run}")
    cfg = load_config(config, overrides)
    run_dir = fit(cfg, resume=args.resume)
    summary = json.loads((run_dir / "fit_summary.json").read_text()) if (run_dir / "fit_summary.json").exists() else {}
    print(f"run folder: {run_dir}")
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


def _evaluate(args) -> int:
    from diffmic.training.run import evaluate

    result = evaluate(args.run, stage=args.verb, ckpt=args.ckpt, overrides=args.overrides, config_path=args.config)
    if args.verb == "test":
        shown = {k: result[k] for k in ("acc", "balanced_acc", "f1", "kappa", "auroc") if k in result}
        summary = {"test": shown, "num_images": result.get("num_images")}
        ref = result.get("referral")
        if ref:
            summary["referral"] = {k: ref[k] for k in ("rule", "referred_fraction", "accuracy_kept",
                                                       "accuracy_referred", "aurc")}
        summary["written"] = str(Path(args.run) / "test_metrics.json")
        print(json.dumps(summary, indent=2))
    else:
        print(json.dumps(result, indent=2))
    return 0


def _predict(args) -> int:
    from diffmic.inference.predictor import Predictor
    from diffmic.reporting import write_rows_csv
    from diffmic.training.run import resolve_checkpoint

    images, over = _expand_inputs(args.inputs)
    if not images:
        raise FileNotFoundError("no images given: pass image files or folders")
    from diffmic.config import ConfigError, parse_value

    eval_over = {}
    for item in over:
        key, value = item.split("=", 1)
        if not key.startswith("eval."):
            raise ConfigError(f"predict accepts eval.* overrides only, got '{key}'")
        eval_over[key.split(".", 1)[1]] = parse_value(key, value)
    if not args.run and not args.ckpt:
        raise ConfigError("predict needs --run DIR or --ckpt FILE")
    ckpt = resolve_checkpoint(Path(args.run), args.ckpt) if args.run else Path(args.ckpt)
    predictor = Predictor.from_checkpoint(ckpt, **eval_over)
    results = predictor.predict([str(p) for p in images], batch_size=args.batch_size)
    rows = [r.as_row() for r in results]
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_rows_csv(out, rows)
        print(f"wrote {len(rows)} predictions to {out}")
    else:
        for r in results:
            flag = "  REFER to a clinician" if r.refer else ""
            print(f"{r.id}\t{r.label}\tp={r.confidence:.3f}\tagreement={r.agreement:.2f}{flag}")
    if args.explain:
        for img, r in zip(images, results):
            predictor.save_explanation(img, r, Path(args.explain) / f"{Path(img).stem}.png")
        print(f"wrote {len(results)} explanation images to {args.explain}")
    return 0


def _data_check(args) -> int:
    from diffmic.config import load_config
    from diffmic.training.run import build_datamodule

    cfg = load_config(args.config, args.overrides)
    dm = build_datamodule(cfg)
    report = dm.check()
    print(report.summary())
    return 1 if report.errors else 0


def _experiment(args) -> int:
    from diffmic.experiment import load_grid, run_grid, summarise

    grid = load_grid(args.grid)
    if not args.summary_only:
        run_grid(grid, only=args.only, log=lambda s: print(s, flush=True))
    paths = summarise(grid, n_boot=args.n_boot)
    print(paths["md"].read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    from diffmic.config import ConfigError
    from diffmic.training.checkpoint import CheckpointError

    errors: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, FileNotFoundError)
    try:
        from diffmic.data.checks import DataError

        errors = errors + (DataError,)
    except ImportError:  # pragma: no cover - data layer always ships
        pass
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:  # positionals given after options (e.g. `--explain DIR eval.steps=10`)
        target = "inputs" if hasattr(args, "inputs") else "overrides"
        if not hasattr(args, target):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, target, list(getattr(args, target)) + extra)
    if args.verb in ("fit", "experiment"):  # imported here so that `diffmic --help` does not load Lightning
        from diffmic.training.module import NonFiniteLossError
        from diffmic.training.run import RunFolderError

        errors = errors + (RunFolderError, NonFiniteLossError)
    try:
        if args.verb == "fit":
            return _fit(args)
        if args.verb in ("validate", "test"):
            return _evaluate(args)
        if args.verb == "predict":
            return _predict(args)
        if args.verb == "data":
            return _data_check(args)
        if args.verb == "experiment":
            return _experiment(args)
    except errors as exc:
        print(f"diffmic {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
