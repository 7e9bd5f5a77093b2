"""The ``diffmic`` command: ``fit``, ``validate``, ``test``, ``predict`` and ``data check``.

Examples::

    diffmic fit --config ham10000 data.root=/data/HAM10000 run.dir=runs/ham
    diffmic fit --run runs/ham --resume
    diffmic test --run runs/ham eval.sampler=ddim eval.steps=10
    diffmic predict --run runs/ham lesion1.jpg folder/ --output preds.csv --explain explain/
    diffmic data check --config my_folder.yaml data.root=/data/my_images
    diffmic serve --run runs/ham --port 8000

Overrides are ``section.key=value`` (YAML values); unknown keys are errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

FAST_HELP = (
    "draw no reverse samples: the same class, calibrated probabilities, prediction set, referral threshold and "
    "out-of-distribution flag from the deterministic read-out alone (eval.point_steps calls), without the sample "
    "agreement, spread and t-test (refused where the model needs the samples for its prediction or its flag)"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffmic", description="DiffMIC: diffusion for medical image classification")
    sub = p.add_subparsers(dest="verb", required=True)

    f = sub.add_parser("fit", help="train a model (DCG warm-up, then joint diffusion training)")
    f.add_argument(
        "--config", help="YAML file or shipped preset name (ham10000, aptos2019, ultrasound, cpu, demo_cpu, ...)"
    )
    f.add_argument("--run", help="run folder (same as run.dir=...); with --resume, its config.yaml is used")
    f.add_argument("--resume", action="store_true", help="resume from <run>/checkpoints/last.ckpt")
    f.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in a non-empty run folder (its checkpoints, logs and results)",
    )
    f.add_argument("overrides", nargs="*", help="section.key=value")

    for verb, text in (("validate", "evaluate on the validation split"), ("test", "evaluate on the test split")):
        v = sub.add_parser(verb, help=text)
        v.add_argument("--run", required=True, help="trained run folder")
        v.add_argument("--ckpt", help="checkpoint (default: <run>/checkpoints/best.ckpt)")
        v.add_argument("--config", help="config (default: <run>/config.yaml)")
        v.add_argument("overrides", nargs="*", help="eval.* / data.* overrides, e.g. eval.sampler=ddim eval.steps=10")

    ca = sub.add_parser(
        "calibrate", help="fit temperature, referral threshold and conformal sets on the validation split"
    )
    ca.add_argument("--run", required=True, help="trained run folder (the fit is stored in its checkpoint)")
    ca.add_argument("--ckpt", help="checkpoint (default: <run>/checkpoints/best.ckpt)")
    ca.add_argument("--config", help="config (default: <run>/config.yaml)")
    ca.add_argument(
        "overrides", nargs="*", help="eval.* overrides, e.g. eval.refer_max_fraction=0.1 eval.conformal_level=0.95"
    )

    rp = sub.add_parser("report", help="write a self-contained HTML report of a tested run")
    rp.add_argument("run", help="run folder (after `diffmic test`)")
    rp.add_argument(
        "--output",
        help="HTML file (default: <run>/report.html); an existing file is replaced only if it is a diffmic report",
    )
    rp.add_argument("--max-images", type=int, default=600, help="test images for the t-SNE and lesion checks")
    rp.add_argument("--gallery", type=int, default=4, help="images per gallery row (correct/wrong/uncertain)")

    pr = sub.add_parser("predict", help="classify image files or folders")
    pr.add_argument("--run", help="trained run folder")
    pr.add_argument(
        "--model",
        help="an exported model folder (diffmic export), or a Hugging Face Hub model id org/name (cached; offline: "
        "the cached snapshot)",
    )
    pr.add_argument("--revision", help="with a Hub --model: the branch, tag or commit to load (default: main)")
    pr.add_argument("--ckpt", help="checkpoint (default: <run>/checkpoints/best.ckpt)")
    pr.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="torch (default): rebuild the PyTorch network; onnx: run an exported model folder's ONNX graphs "
        "(diffmic export --onnx) with ONNX Runtime on the CPU, without timm/torchvision (faster start-up)",
    )
    pr.add_argument("--fast", action="store_true", help=FAST_HELP)
    pr.add_argument("--output", help="CSV file for the predictions (default: print)")
    pr.add_argument("--explain", help="folder for per-image saliency/ROI PNGs")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images (listed on stderr) instead of stopping"
    )
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
    _add_portable_parsers(p, sub, dsub)

    sv = sub.add_parser("serve", help="web page: upload an image, see its class, uncertainty, saliency and regions")
    sv.add_argument(
        "--run", help="trained run folder (uses checkpoints/best.ckpt), a checkpoint file, or an exported model folder"
    )
    sv.add_argument("--ckpt", help="checkpoint file (default: <run>/checkpoints/best.ckpt)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    sv.add_argument("--max-mb", type=float, default=20.0, help="largest upload accepted, in MB (default 20)")
    sv.add_argument(
        "--max-queue",
        type=int,
        default=4,
        help="uploads that may wait while one is classified (default 4); more get HTTP 503 'busy' with Retry-After",
    )
    sv.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="torch (default) or onnx: serve an exported model folder's ONNX graphs with ONNX Runtime on the CPU",
    )
    sv.add_argument("--fast", action="store_true", help=FAST_HELP)
    sv.add_argument("overrides", nargs="*", help="eval.* overrides, e.g. eval.num_samples=8")

    # -v/--verbose anywhere: `diffmic -v fit ...` or `diffmic fit ... --verbose`
    p.add_argument("-v", "--verbose", action="store_true", help="show Lightning's full output (tips, model summary)")
    for sp in [*sub.choices.values(), *dsub.choices.values()]:
        sp.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show Lightning's full output (INFO lines, tips, model summary)",
        )
    return p


def _expand_inputs(items: list[str]) -> tuple[list[Path], list[str]]:
    from diffmic.data.sources import IMAGE_EXTENSIONS as IMAGE_SUFFIXES  # one list, shared with the data layer

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


def _expand_inputs_with_roots(items: list[str]) -> tuple[list[Path], list, list[Path], list[str]]:
    """Like :func:`_expand_inputs`, also returning for each image the folder it was found in
    (``None`` for a file given directly) and the input folders; the same file is kept once."""
    images: list[Path] = []
    roots: list = []
    dirs: list[Path] = []
    overrides: list[str] = []
    seen: set[str] = set()
    for item in items:
        found, over = _expand_inputs([item])
        overrides.extend(over)
        p = Path(item)
        if found and p.is_dir():
            dirs.append(p)
        for q in found:
            key = os.path.realpath(q)
            if key not in seen:
                seen.add(key)
                images.append(q)
                roots.append(p if p.is_dir() else None)
    return images, roots, dirs, overrides


def _check_config_path(config: Optional[str]) -> None:
    if config and Path(config).is_dir():
        from diffmic.config import ConfigError

        raise ConfigError(
            f"--config '{config}' is a folder; give a YAML file (or a preset name), e.g. {Path(config) / 'config.yaml'}"
        )


def _fit(args) -> int:
    from diffmic.api import resolve_config  # one resolution for the command and diffmic.fit
    from diffmic.training.run import fit

    _check_config_path(args.config)
    cfg = resolve_config(args.config, list(args.overrides), run=args.run or None, resume=args.resume)
    if args.resume and args.overwrite:
        from diffmic.config import ConfigError

        raise ConfigError("--resume and --overwrite exclude each other: resume keeps the run, overwrite replaces it")
    run_dir = fit(cfg, resume=args.resume, overwrite=args.overwrite)
    if not _is_rank_zero():  # DDP: one summary, from rank 0
        return 0
    summary = json.loads((run_dir / "fit_summary.json").read_text()) if (run_dir / "fit_summary.json").exists() else {}
    print(f"run folder: {run_dir}")
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


def _is_rank_zero() -> bool:
    """False on the other processes of a multi-GPU (DDP) run."""
    from lightning.pytorch.utilities import rank_zero_only

    # Lightning records the process rank as an attribute of this function when it is imported
    return getattr(rank_zero_only, "rank", 0) == 0


def _evaluate(args) -> int:
    from diffmic.training.run import evaluate

    _check_config_path(args.config)
    result = evaluate(args.run, stage=args.verb, ckpt=args.ckpt, overrides=args.overrides, config_path=args.config)
    if not _is_rank_zero():  # DDP: one summary, from rank 0
        return 0
    if args.verb == "test":
        shown = {k: result[k] for k in ("acc", "balanced_acc", "f1", "kappa", "auroc") if k in result}
        summary = {"test": shown, "num_images": result.get("num_images")}
        ref = result.get("referral")
        if ref:
            summary["referral"] = {
                k: ref[k] for k in ("rule", "referred_fraction", "accuracy_kept", "accuracy_referred", "aurc")
            }
        ci = result.get("ci", {})
        if ci:
            summary["ci95"] = {k: [round(v, 4) for v in ci[k]] for k in ci}
        for block, keys in (
            (
                "calibration",
                ("calibrator", "temperature", "ece", "ece_unscaled", "classwise_ece", "nll", "nll_unscaled", "brier"),
            ),
            ("uncertainty", ("pavpu", "uncertain_fraction", "accuracy_confident", "accuracy_uncertain")),
            ("conformal", ("kind", "level", "coverage", "mean_set_size", "min_class_coverage", "classes_short")),
            ("ood", ("rule", "flagged", "flagged_fraction")),
            ("lesions", ("num_images", "roi_overlap", "roi_overlap_random", "peak_hit", "pointing_hit")),
        ):
            if block in result:
                summary[block] = {k: result[block].get(k) for k in keys}
        summary["written"] = str(Path(args.run) / "test_metrics.json")
        print(json.dumps(summary, indent=2))
    else:
        print(json.dumps(result, indent=2))
    return 0


def _calibrate(args) -> int:
    from diffmic.training.run import calibrate
    from diffmic.trust.ood import public

    calib = calibrate(args.run, ckpt=args.ckpt, overrides=args.overrides, config_path=args.config)
    print(json.dumps({**calib, "ood": public(calib.get("ood"))}, indent=2))  # without its matrices
    return 0


def _report(args) -> int:
    from diffmic.inference.explain import build_report
    from diffmic.outputs import writing_run_outputs

    # recorded in the run folder's manifest: `fit --overwrite` removes them with the old run
    # (report.html only where it goes into the run folder)
    run, html = Path(args.run), Path(args.run) / "report.html"
    into_run = args.output is None or os.path.realpath(args.output) == os.path.realpath(html)
    with writing_run_outputs(run, ["report_files", "lesion_hits.json", *(["report.html"] if into_run else [])]):
        out = build_report(
            Path(args.run),
            Path(args.output) if args.output else None,
            max_images=args.max_images,
            gallery_size=args.gallery,
        )
    print(f"wrote {out}")
    return 0


def _predict(args) -> int:
    from diffmic.inference.predictor import Predictor
    from diffmic.outputs import plan_outputs
    from diffmic.reporting import write_rows_csv
    from diffmic.training.loading import resolve_checkpoint  # no Lightning: predict does not train

    images, roots, input_dirs, over = _expand_inputs_with_roots(args.inputs)
    if not images:
        raise FileNotFoundError("no images given: pass image files or folders")
    from diffmic.config import ConfigError, parse_value

    eval_over = {}
    for item in over:
        key, value = item.split("=", 1)
        if not key.startswith("eval."):
            raise ConfigError(f"predict accepts eval.* overrides only, got '{key}'")
        eval_over[key.split(".", 1)[1]] = parse_value(key, value)
    given = sum(bool(a) for a in (args.run, args.model)) + bool(args.ckpt and not args.run)
    if given == 0:
        raise ConfigError("predict needs --run DIR or --ckpt FILE (or --model FOLDER|ORG/NAME)")
    if given > 1:
        raise ConfigError("predict takes one model: --run DIR [--ckpt FILE], --ckpt FILE or --model FOLDER|ORG/NAME")
    if args.revision and not args.model:
        raise ConfigError("--revision applies to a Hub model given with --model ORG/NAME")
    # every output checked before the model is loaded or anything is written
    explain_paths = plan_outputs(images, roots, input_dirs, args.output, args.explain)
    if args.backend == "onnx" and args.ckpt:
        raise ConfigError("--backend onnx runs an exported model folder (--model FOLDER or --run FOLDER), not --ckpt")
    if args.model:  # an exported model folder, on disk or on the Hugging Face Hub
        predictor = Predictor.from_pretrained(
            args.model, args.revision, backend=args.backend, fast=args.fast, **eval_over
        )
    elif args.run and not args.ckpt:  # a run folder or an exported model folder (diffmic export)
        predictor = Predictor.load(args.run, backend=args.backend, fast=args.fast, **eval_over)
    else:
        ckpt = resolve_checkpoint(Path(args.run), args.ckpt) if args.run else Path(args.ckpt)
        predictor = Predictor.from_checkpoint(ckpt, fast=args.fast, **eval_over)
    good = _readable_images(images, predictor.cfg.data.image_size, predictor.cfg.data.in_chans, args.skip_bad)
    images = [images[i] for i in good]
    if explain_paths is not None:
        explain_paths = [explain_paths[i] for i in good]
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
            extra = ""
            if r.prediction_set is not None:
                extra += f"\tset={{{', '.join(r.prediction_set)}}}"
            if r.uncertain is not None:
                extra += f"\t{'uncertain' if r.uncertain else 'confident'} (t-test p={r.ttest_p:.3g})"
            if r.ood:
                extra += "\tdoes not look like the training data"
            print(f"{r.id}\t{r.label}\tp={r.confidence:.3f}\tagreement={r.agreement:.2f}{extra}{flag}")
    print(f"referral rule: {predictor.referral_rule}", file=sys.stderr)  # the rule REFER follows
    if predictor.ood_rule is not None:  # the flag applied, or why there is none
        print(f"out-of-distribution flag: {predictor.ood_rule}", file=sys.stderr)
    if args.explain and explain_paths is not None:
        for img, r, dest in zip(images, results, explain_paths):
            predictor.save_explanation(img, r, dest)
        print(f"wrote {len(results)} explanation images to {args.explain}")
    return 0


def _readable_images(images: list[Path], image_size: int, in_chans: int, skip_bad: bool) -> list[int]:
    """Positions of the images that decode; every bad one is named (an error listing all of them,
    or with ``skip_bad`` a line each on stderr)."""
    from diffmic.data.records import DataError
    from diffmic.data.transforms import decode_image

    good, bad = [], []
    for i, p in enumerate(images):
        try:
            decode_image(p, image_size, in_chans)
            good.append(i)
        except DataError as exc:
            bad.append(str(exc))
    if bad and not skip_bad:
        raise DataError(
            f"{len(bad)} of {len(images)} images cannot be read; nothing was predicted "
            "(fix or remove them, or pass --skip-bad):\n  " + "\n  ".join(bad)
        )
    for b in bad:
        print(f"skipped: {b}", file=sys.stderr)
    if not good:
        raise DataError("no readable images left to predict")
    return good


def _data_check(args) -> int:
    from diffmic.config import load_config
    from diffmic.training.run import build_datamodule

    _check_config_path(args.config)
    cfg = load_config(args.config, args.overrides)
    dm = build_datamodule(cfg)
    report = dm.check()
    print(report.summary())
    return 1 if report.errors else 0


def _add_portable_parsers(p, sub, dsub) -> None:
    """``--version``, ``data download`` and ``export`` (see diffmic.data.download, diffmic.export)."""
    from diffmic import __version__

    p.add_argument("--version", action="version", version=f"diffmic {__version__}")
    dd = dsub.add_parser("download", help="download a public data set into the layout the loaders read")
    dd.add_argument(
        "name",
        help="ham10000, aptos2019 (instructions only), breastmnist, pneumoniamnist, ... (diffmic data download --list)",
        nargs="?",
    )
    dd.add_argument("--root", default="data", help="parent folder: the data set goes to ROOT/NAME (default: data)")
    dd.add_argument("--mirror", help="fetch https://HOST/PATH from MIRROR/HOST/PATH instead")
    dd.add_argument("--keep-archives", action="store_true", help="keep the downloaded archives")
    dd.add_argument("--no-progress", action="store_true", help="no progress bar")
    dd.add_argument("--list", action="store_true", help="list the data sets that can be downloaded")
    ex = sub.add_parser("export", help="write a portable model folder (safetensors, JSON config, model card)")
    ex.add_argument("--run", help="trained run folder")
    ex.add_argument("--ckpt", help="checkpoint (default: <run>/checkpoints/best.ckpt)")
    ex.add_argument("--out", required=True, help="new (or empty) output folder")
    ex.add_argument("--onnx", action="store_true", help="also write ONNX graphs (needs the [onnx] extra)")
    ex.add_argument(
        "--onnx-batch",
        type=int,
        default=1,
        help="with --onnx: the encoder graph's fixed batch size (default 1; `predict --backend onnx` runs any "
        "number of images in chunks of it)",
    )
    ex.add_argument(
        "--push-to-hub",
        metavar="ORG/NAME",
        help="then upload the folder with its model card to this Hugging Face Hub model repository",
    )
    ex.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository as private")


def _data_download(args) -> int:
    from diffmic.data.download import available_datasets, download_dataset, download_source

    if args.list or not args.name:
        for name in available_datasets():
            src = download_source(name)
            print(f"{name}\t{getattr(src, 'description', 'manual download (see: diffmic data download ' + name + ')')}")
        return 0 if args.list else 2
    download_dataset(
        args.name, args.root, mirror=args.mirror, progress=not args.no_progress, keep_archives=args.keep_archives
    )
    return 0


def _export(args) -> int:
    from diffmic.inference.export import ExportError, export_model

    if args.push_to_hub:
        from diffmic.inference.hub import is_repo_id

        if not is_repo_id(args.push_to_hub):  # before the export, not after it
            raise ExportError(f"--push-to-hub: {args.push_to_hub!r} is not a Hub model id (org/name)")
    out = export_model(run=args.run, ckpt=args.ckpt, out=args.out, onnx=args.onnx, onnx_batch=args.onnx_batch)
    print(f"wrote a portable model folder to {out}")
    if args.push_to_hub:
        from diffmic.inference.hub import push_to_hub

        url = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f"pushed it to the Hugging Face Hub: {url}")
    return 0


def _serve(args) -> int:
    from diffmic.inference.serve import serve_main

    return serve_main(args)


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
    early = sys.argv[1:] if argv is None else list(argv)
    if early[:1] in (["--version"], ["--help"], ["-h"]):  # answered before Lightning is imported
        _parser().parse_args(early)
    from diffmic.config import ConfigError
    from diffmic.outputs import OutputError
    from diffmic.training.loading import CheckpointError  # the class of training.checkpoint, without Lightning

    errors: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, FileNotFoundError, OutputError)
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
        from diffmic.nn.encoders import WeightsError

        errors = errors + (WeightsError,)
    if args.verb in ("validate", "test"):
        from diffmic.training.run import RunFolderError

        errors = errors + (RunFolderError,)
    if args.verb in ("export", "predict", "serve"):
        from diffmic.inference.export import ExportError
        from diffmic.inference.predictor import FastPathError

        errors = errors + (ExportError, FastPathError)
    # predict and serve run without Lightning (issue 27.2): importing it to quieten it would cost seconds
    if args.verb in ("fit", "validate", "test", "export", "experiment", "calibrate"):
        from diffmic.training.console import quiet

        quiet(not args.verbose)
    try:
        if args.verb == "serve":
            return _serve(args)
        if args.verb == "fit":
            return _fit(args)
        if args.verb in ("validate", "test"):
            return _evaluate(args)
        if args.verb == "predict":
            return _predict(args)
        if args.verb == "calibrate":
            return _calibrate(args)
        if args.verb == "report":
            return _report(args)
        if args.verb == "data" and args.data_verb == "download":
            return _data_download(args)
        if args.verb == "export":
            return _export(args)
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
