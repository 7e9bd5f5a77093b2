"""``diffmic report RUN``: the figures and checks that need the model (t-SNE of the denoised label
vectors, lesion hit rates of the DCG's regions and saliency, a gallery of explanations) and the
self-contained HTML report of a tested run."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmic.config import Config, ConfigError, load_config
from diffmic.data.sources import find_dataset, image_id_file
from diffmic.devices import default_device
from diffmic.diffusion.reverse import reverse_sample
from diffmic.reporting import write_json
from diffmic.reporting.figures import PLAIN, plain_text
from diffmic.reporting.html import esc, is_our_report, png_data_uri, table, write_report
from diffmic.trust.lesions import image_hits, lesion_mask_dir, mask_file, read_mask, summarise_hits
from diffmic.trust.ood import rule_text as ood_rule_text


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subset_indices(labels: list[int], n: int, seed: int) -> list[int]:
    """``n`` test images drawn at random (seeded), all of them if fewer."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g).tolist()
    return sorted(order[: min(n, len(labels))])


@torch.no_grad()
def label_trajectories(module, dataset, idx: list[int], batch_size: int = 64) -> tuple[Tensor, list[int]]:
    """The reverse path of one sample per image (``idx`` of ``dataset``) under the run's eval
    settings (:meth:`~diffmic.config.EvalConfig.reverse_kwargs`, as the Predictor and ``diffmic test``
    sample): the label vectors ``[S, N, C]`` at each reverse step, the last being y0, and the labels."""
    kwargs = {**module.cfg.eval.reverse_kwargs(), "num_samples": 1, "point_steps": 0}  # one sample's path
    trajs, labels = [], []
    for s in range(0, len(idx), batch_size):
        items = [dataset[i] for i in idx[s : s + batch_size]]
        x = torch.stack([it["image"] for it in items]).to(module.device)
        out = reverse_sample(
            module.model, module.schedule, x, **kwargs, ids=[it["id"] for it in items], return_trajectory=True
        )
        assert out.trajectory is not None  # asked for with return_trajectory=True
        trajs.append(torch.stack([t[:, 0] for t in out.trajectory]).cpu())  # [S,B,C]
        labels += [int(it["label"]) for it in items]
    return torch.cat(trajs, 1), labels


def tsne_figure(
    module, dataset, idx: list[int], class_names: list[str], seed: int, num_panels: int = 4, batch_size: int = 64
):
    """The paper's Fig. 2: t-SNE of the denoised label vectors y_t at several reverse steps (one
    sample per image, :func:`label_trajectories`), coloured by the true class. Returns (figure, the
    steps shown)."""
    from sklearn.manifold import TSNE

    traj, labels = label_trajectories(module, dataset, idx, batch_size)
    S = traj.shape[0]
    pick = sorted({round(float(v)) for v in np.linspace(0, S - 1, num_panels)})
    plt = _plt()
    fig, axes = plt.subplots(1, len(pick), figsize=(3.2 * len(pick), 3.4), dpi=110, squeeze=False)
    y = np.array(labels)
    for ax, k in zip(axes[0], pick):
        emb = TSNE(n_components=2, random_state=seed, init="pca", perplexity=min(30, len(y) - 1)).fit_transform(
            traj[k].numpy().astype(np.float64)
        )
        for c, name in enumerate(class_names):
            m = y == c
            if m.any():
                ax.scatter(emb[m, 0], emb[m, 1], s=4, label=plain_text(name))
        ax.set_title(
            f"reverse step {k + 1 if k < S - 1 else 'final'} of {S}" if k < S - 1 else f"final y0 ({S} states)",
            fontsize=8,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    leg = axes[0][0].legend(fontsize=6, markerscale=2, loc="best")
    for t in leg.get_texts():
        t.set_usetex(False)
    fig.tight_layout()
    return fig, pick


def _mask_path(cfg, image_id: str) -> Path | None:
    return mask_file(lesion_mask_dir(cfg.data.dataset, cfg.data.root), image_id)


def _original_path(cfg, image_id: str) -> Path | None:
    """The original image file of a test item, as the data set's entry in ``data.sources.REGISTRY``
    finds it (``None``: the report shows the network input)."""
    spec = find_dataset(cfg.data.dataset)
    root = Path(cfg.data.root) if cfg.data.root else None
    find = spec.original_image if spec is not None else image_id_file
    return find(root, image_id)


@torch.no_grad()
def lesion_check(module, dataset, idx: list[int], cfg, batch_size: int = 64) -> dict | None:
    """Mean hit rates of the DCG regions and saliency (true class) over images with a lesion mask
    (as ``diffmic test`` computes test_metrics.json's ``lesions`` block over every test image)."""
    rows = []
    for s in range(0, len(idx), batch_size):
        items = [dataset[i] for i in idx[s : s + batch_size]]
        x = torch.stack([it["image"] for it in items]).to(module.device)
        g = module.model.guide(x)
        for b, it in enumerate(items):
            mp = _mask_path(cfg, it["id"])
            if mp is None:
                continue
            rows.append(
                image_hits(
                    read_mask(mp),
                    g.saliency[b, int(it["label"])].float().cpu().numpy(),
                    g.roi_boxes[b].cpu().tolist(),
                    cfg.data.image_size,
                )
            )
    return summarise_hits(rows)


#: what a gallery file name keeps of an image id: letters, digits, ``.``, ``_`` and ``-``
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def gallery_file_name(n: int, image_id: str) -> str:
    """``gallery-NN-<stem>.png``: the running number ``n`` makes names unique (also when the same
    image shows in two rows, or two ids share a stem); the stem of the id's last path component,
    reduced to safe characters, only helps a reader. Never a path: an absolute or ``..`` id
    cannot lead the file out of the gallery folder."""
    stem = _SAFE.sub("_", PurePath(str(image_id).replace("\\", "/")).stem).strip("._-")[:48] or "image"
    return f"gallery-{n:02d}-{stem}.png"


def gallery_selection(rows: list[dict], per_row: int, seed: int) -> list[tuple[str, list[tuple[dict, str]]]]:
    """Correct, wrong and uncertain test rows (seeded), each with the name of its gallery PNG."""
    g = torch.Generator().manual_seed(seed)

    def pick(cond):
        cand = [r for r in rows if cond(r)]
        order = torch.randperm(len(cand), generator=g).tolist()[:per_row]
        return [cand[i] for i in order]

    groups = [
        ("correct, kept", pick(lambda r: int(r["label"]) == int(r["pred"]) and int(r.get("refer", 0)) == 0)),
        ("wrong", pick(lambda r: int(r["label"]) != int(r["pred"]))),
        (
            "uncertain (t-test) or referred",
            pick(lambda r: int(r.get("uncertain", 0)) == 1 or int(r.get("refer", 0)) == 1),
        ),
    ]
    out, n = [], 0
    for title, sel in groups:
        named = []
        for r in sel:
            n += 1
            named.append((r, gallery_file_name(n, r["id"])))
        out.append((title, named))
    return out


def check_gallery_folder(run_dir: Path, fig_dir: Path, selection) -> None:
    """Before anything is computed: the gallery folder is a folder inside the run, no gallery PNG
    would replace a file that is not one of our explanation images, and ``lesion_hits.json`` is
    ours where it exists. Raises OutputError naming the file."""
    from diffmic.outputs import OutputError, is_our_png

    if fig_dir.is_symlink() or (fig_dir.exists() and not fig_dir.is_dir()):
        raise OutputError(
            f"'{fig_dir}' is not a folder of the run (a file or a link); diffmic report writes its "
            "gallery images there: move it away. Nothing was written."
        )
    lesion_file = run_dir / "lesion_hits.json"
    if lesion_file.exists() or lesion_file.is_symlink():
        try:
            ours = (
                lesion_file.is_file()
                and not lesion_file.is_symlink()
                and "saliency_class" in json.loads(lesion_file.read_text(encoding="utf-8"))
            )
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise OutputError(
                f"'{lesion_file}' exists and is not lesion hit rates written by diffmic; nothing was "
                "written. Move it away and run `diffmic report` again."
            )
    foreign = [fig_dir / name for _, sel in selection for _, name in sel]
    foreign = [p for p in foreign if (p.exists() or p.is_symlink()) and (p.is_symlink() or not is_our_png(p))]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise OutputError(
            f"'{foreign[0]}'{more} exists and is not a gallery image written by diffmic; nothing was "
            "written. Move it away and run `diffmic report` again."
        )


def _display_original(path: Path, in_chans: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The original image for drawing, at most MAX_PANEL_PX on its long side (decoded that small
    where the format allows), and its full (W, H) as the network saw it (EXIF orientation applied)."""
    from diffmic.data.transforms import display_image
    from diffmic.reporting.overlay import MAX_PANEL_PX

    return display_image(path, in_chans, MAX_PANEL_PX)


@torch.no_grad()
def explanation_gallery(module, dataset, selection, cfg, out_dir: Path) -> list[tuple[str, list]]:
    """PNG explanations (the original image, bounded size) of the rows of :func:`gallery_selection`,
    written under ``out_dir`` only; returns (title, [(png, image id, caption)]) per group."""
    from PIL import Image

    from diffmic.reporting.overlay import draw_explanation

    index = {it_id: i for i, it_id in enumerate(dataset.ids)} if hasattr(dataset, "ids") else {}
    names = list(module.class_names)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for title, sel in selection:
        figs = []
        for r, file_name in sel:
            i = index.get(r["id"])
            if i is None:
                continue
            item = dataset[i]
            x = item["image"][None].to(module.device)
            gd = module.model.guide(x) if module.model.uses_dcg else None
            op = _original_path(cfg, r["id"])
            size = None
            if op is not None:
                img, size = _display_original(op, cfg.data.in_chans)
            else:  # the network input, de-normalised
                from diffmic.data.transforms import norm_stats

                mean, std = (torch.tensor(v)[:, None, None] for v in norm_stats(cfg.data.in_chans))
                img = ((item["image"] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            mp = _mask_path(cfg, r["id"])
            mask = None
            if mp is not None and size is not None:
                with Image.open(mp) as im:
                    mask = np.array(im.convert("L")) > 127
                if mask.shape != (size[1], size[0]):
                    mask = None  # a mask of another size would be drawn in the wrong place
            k = int(r["pred"])
            cap = (
                f"{r['id']}: true {names[int(r['label'])]}, pred {names[k]} p={float(r['confidence']):.2f}"
                + (f", set {{{r['set'].replace('|', ', ')}}}" if r.get("set") else "")
                + (", t-test uncertain" if int(r.get("uncertain", 0)) else "")
            )
            png = out_dir / file_name
            draw_explanation(
                img,
                gd.saliency[0, k].float().cpu().numpy() if gd is not None else None,
                gd.roi_boxes[0].cpu().tolist() if gd is not None else None,
                [float(a) for a in gd.roi_attention[0].cpu()] if gd is not None else None,
                cfg.data.image_size,
                f"pred {names[k]}",
                png,
                mask=mask,
                original_size=size,
            )
            figs.append((png, str(r["id"]), cap))
        out.append((title, figs))
    return out


def _confusion(cm: list[list[int]], names: list[str]):
    plt = _plt()
    a = np.array(cm)
    fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=110)
    ax.imshow(a, cmap="Blues")
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            ax.text(
                j,
                i,
                str(a[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if a[i, j] > a.max() / 2 else "black",
            )
    shown = [plain_text(n) for n in names]
    ax.set_xticks(range(len(names)), shown, fontsize=7, rotation=45, **PLAIN)
    ax.set_yticks(range(len(names)), shown, fontsize=7, **PLAIN)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    return fig


def _conformal_figure(conf: dict):
    plt = _plt()
    per = conf.get("per_class", {})
    names = list(per)
    at = list(range(len(names)))
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=110)
    axes[0].bar(at, [per[n]["coverage"] for n in names])
    axes[0].axhline(conf["level"], color="C3", ls="--", label=f"level {conf['level']:.2f}")
    axes[0].axhline(conf["coverage"], color="k", lw=0.8, label=f"overall {conf['coverage']:.3f}")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("coverage per true class", fontsize=9)
    axes[0].legend(fontsize=7, loc="lower left")
    axes[1].bar(at, [per[n]["mean_set_size"] for n in names], color="C1")
    axes[1].set_title(f"mean set size (overall {conf['mean_set_size']:.2f})", fontsize=9)
    for ax in axes:  # class names as fixed tick labels, plain text (not categorical units)
        ax.set_xticks(at, [plain_text(n) for n in names], fontsize=7, rotation=45, **PLAIN)
    fig.tight_layout()
    return fig


def _scrolling(inner: str) -> str:
    """A wide table scrolls inside its panel instead of widening the page."""
    return f"<div style='overflow-x:auto;max-width:100%'>{inner}</div>"


def _conformal_table(conf: dict) -> str:
    """Per-class coverage and mean set size of every conformal method fitted on validation (issue
    25.1), the applied one first; every value from test_metrics.json escaped by :func:`table`."""
    methods = dict(conf.get("compared") or {})
    applied = conf.get("kind", "aps")
    if not methods:
        methods = {applied: conf}
    order = [applied] + [m for m in methods if m != applied] if applied in methods else list(methods)
    names = list(conf.get("per_class", {}))
    head = ["class", "test images"]
    for m in order:
        tag = f"{m} (applied)" if m == applied else m
        head += [f"{tag} coverage", f"{tag} set size"]
    rows = []
    for n in names:
        row = [n, conf["per_class"][n].get("n", "")]
        for m in order:
            pc = methods[m].get("per_class", {}).get(n, {})
            row += [pc.get("coverage", ""), pc.get("mean_set_size", "")]
        rows.append(row)
    total = ["all images", sum(int(v.get("n", 0)) for v in conf.get("per_class", {}).values())]
    for m in order:
        total += [methods[m].get("coverage", ""), methods[m].get("mean_set_size", "")]
    rows.append(total)
    notes = []
    for m in order:
        short = methods[m].get("classes_short") or []
        always = methods[m].get("always_included") or []
        line = f"{m}: " + (
            f"covered less than the level minus 3 points: {', '.join(map(str, short))}"
            if short
            else "every class within 3 points of the level (or above)"
        )
        if always:
            line += f"; in every set (too few validation images for the level): {', '.join(map(str, always))}"
        notes.append(f"<p>{esc(line)}</p>")
    return _scrolling(table(head, rows)) + "".join(notes)


def _calibrators_panel(cal: dict) -> str:
    """Every calibrator fitted on validation, applied to the test split, for the read-out and for
    the DCG prior (issue 25.2): test scores beside the held-out validation ones; values escaped."""
    head = [
        "probabilities",
        "calibrator",
        "test ECE",
        "test classwise ECE",
        "test NLL",
        "test Brier",
        "test accuracy",
        "arg-max changed",
        "validation CV ECE",
        "validation CV NLL",
    ]
    rows = []
    for what, block in (("diffusion read-out", cal), ("DCG prior", cal.get("prior") or {})):
        applied = block.get("calibrator")
        for kind, v in (block.get("compared") or {}).items():
            cv = v.get("val_cv") or {}
            rows.append(
                [
                    what,
                    f"{kind} (applied)" if kind == applied else kind,
                    v.get("ece", ""),
                    v.get("classwise_ece", ""),
                    v.get("nll", ""),
                    v.get("brier", ""),
                    v.get("acc", ""),
                    v.get("argmax_changed", ""),
                    cv.get("ece", ""),
                    cv.get("nll", ""),
                ]
            )
    if not rows:
        return "<p>No comparison of calibrators stored (calibrated by an older diffmic: run diffmic calibrate).</p>"
    return _scrolling(table(head, rows)) + (
        "<p>Each calibrator is fitted on the validation split and applied to the test split; "
        "the validation CV columns are held-out folds of the validation split (what eval.calibrator=auto "
        "chooses from). Vector, matrix and Dirichlet scaling may change the predicted class.</p>"
    )


def _num(v, fmt: str = "{:.3f}") -> str:
    """A number from test_metrics.json, formatted; anything else as it is (escaped by the caller)."""
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _ood_panel(tm: dict) -> str:
    """The out-of-distribution panel: score, threshold, how many test images it flagged."""
    ood = tm.get("ood")
    if not isinstance(ood, dict) or ood.get("score") is None:
        rule = ood.get("rule") if isinstance(ood, dict) and ood.get("rule") else ood_rule_text(None)
        return f"<p>{esc(rule)}</p>"
    n = tm.get("num_images")
    rows: list[list[Any]] = [
        ["score", ood.get("score")],
        ["threshold (flag when the score is above it)", _num(ood.get("threshold"), "{:.4g}")],
        ["fitted on", f"{ood.get('fitted_on')} ({ood.get('num_images')} images)"],
        ["false flag rate asked", _num(ood.get("false_flag_rate"), "{:.1%}")],
        ["test images flagged", f"{ood.get('flagged')} of {n} ({_num(ood.get('flagged_fraction'), '{:.1%}')})"],
        [
            "accuracy of the flagged / not flagged",
            f"{_num(ood.get('accuracy_flagged'))} / {_num(ood.get('accuracy_not_flagged'))}",
        ],
    ]
    return (
        table(["", "value"], rows)
        + "<p>"
        + esc(f"Flagged images are referred whatever their confidence. Rule: {ood.get('rule', '')}")
        + "</p>"
    )


def check_report_output(run_dir: Path, output: Path | None) -> Path:
    """The report's HTML file, checked before anything is computed: never a folder, and an
    existing file only when it is a report diffmic wrote (so never an input image, a checkpoint,
    a config or a user's notes). Raises OutputError naming the file."""
    from diffmic.outputs import OutputError

    out = Path(output) if output is not None else Path(run_dir) / "report.html"
    what = "--output" if output is not None else "the default output"
    if out.is_dir():
        raise OutputError(f"{what} '{out}' is a folder; give an HTML file name, e.g. {out / 'report.html'}")
    if (out.exists() or out.is_symlink()) and not is_our_report(out):
        raise OutputError(
            f"{what} '{out}' exists and is not a report written by diffmic; nothing was written. "
            "Choose another file (--output FILE.html) or move it away."
        )
    return out


Panel = tuple[str, str, str]  # (id, heading, HTML body) of one report section


def build_report(run_dir: Path, output: Path | None = None, max_images: int = 600, gallery_size: int = 4) -> Path:
    """Write the self-contained HTML report of a tested run (``diffmic report``): the test metrics
    and figures, the t-SNE of the denoised label vectors, the lesion checks and the gallery."""
    from diffmic.training.checkpoint import load_module
    from diffmic.training.run import build_datamodule, resolve_checkpoint

    run_dir = Path(run_dir)
    tm, rows, cfg = _read_tested_run(run_dir)
    output = check_report_output(run_dir, output)
    # every file the report writes is checked before the model is loaded or anything is written
    fig_dir = run_dir / "report_files"
    selection = gallery_selection(rows, gallery_size, cfg.run.seed)
    check_gallery_folder(run_dir, fig_dir, selection)
    module = load_module(
        resolve_checkpoint(
            run_dir, tm.get("checkpoint") if tm.get("checkpoint") and Path(tm["checkpoint"]).exists() else None
        )
    )
    device = default_device()
    module.to(device).eval()
    dm = build_datamodule(cfg)
    dm.setup("test")
    ds = dm.get_dataset("test")
    names = list(module.class_names)
    labels = [int(ds[i]["label"]) for i in range(len(ds))] if not hasattr(ds, "labels") else list(ds.labels)
    idx = subset_indices(labels, max_images, cfg.run.seed)

    panels = [
        _metrics_panel(tm),
        *_result_panels(tm, names, run_dir),
        _tsne_panel(module, ds, idx, names, cfg.run.seed),
    ]
    panels.append(("ood", "Out-of-distribution flag (images unlike the training data)", _ood_panel(tm)))
    panels.append(_lesions_panel(tm, module, ds, idx, cfg, run_dir))
    panels.append(_gallery_panel(explanation_gallery(module, ds, selection, cfg, fig_dir)))
    output.parent.mkdir(parents=True, exist_ok=True)
    return write_report(
        output,
        f"diffmic report: {run_dir}",
        panels,
        intro=f"variant {tm.get('variant')}, sampler {tm.get('sampler')}, K = {tm.get('num_samples')}",
    )


def _read_tested_run(run_dir: Path) -> tuple[dict, list[dict], Config]:
    """test_metrics.json, the rows of predictions.csv and the config of a tested run (an error
    naming the command to run when the test is missing or predates the calibration block)."""
    metrics_file, preds_file = run_dir / "test_metrics.json", run_dir / "predictions.csv"
    for f in (metrics_file, preds_file, run_dir / "config.yaml"):
        if not f.is_file():
            raise FileNotFoundError(f"'{f}' not found: run `diffmic test --run {run_dir}` first")
    tm = json.loads(metrics_file.read_text())
    if "calibration" not in tm:
        raise ConfigError(
            f"'{metrics_file}' has no calibration block (written by an older diffmic): "
            f"run `diffmic test --run {run_dir}` again"
        )
    with open(preds_file, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return tm, rows, load_config(run_dir / "config.yaml")


def _metrics_panel(tm: dict) -> Panel:
    """The test metrics with their 95 % bootstrap intervals, and the rules behind them in words."""
    ci = tm.get("ci", {})

    def with_ci(k: str, v: object) -> list:
        lo, hi = ci.get(k, [None, None])
        return [k, v if v is not None else "n/a", lo if lo is not None else "", hi if hi is not None else ""]

    cal, unc, conf, ref = tm["calibration"], tm.get("uncertainty", {}), tm.get("conformal", {}), tm.get("referral", {})
    head = [with_ci(k, tm.get(k)) for k in ("acc", "balanced_acc", "f1", "kappa", "auroc")]
    head += [with_ci(k, cal.get(k)) for k in ("ece", "ece_unscaled", "nll", "brier")]
    head += [
        with_ci("aurc", ref.get("aurc")),
        with_ci("referred_fraction", ref.get("referred_fraction")),
        with_ci("accuracy_kept", ref.get("accuracy_kept")),
        with_ci("pavpu", unc.get("pavpu")),
        with_ci("conformal_coverage", conf.get("coverage")),
        with_ci("mean_set_size", conf.get("mean_set_size")),
    ]
    return (
        "metrics",
        "Test metrics with 95 % bootstrap intervals",
        table(["metric", "value", "CI low", "CI high"], head)
        + "<p>"
        + esc(
            f"{tm.get('num_images')} test images; calibration: {cal.get('calibrator', 'temperature')} "
            f"(temperature {_num(cal.get('temperature'))}) fitted on "
            f"{cal.get('fitted_on')}; {tm.get('ci_method', '')}. Referral rule: {ref.get('rule', '')}. "
            f"Uncertainty: {unc.get('method', '')}; accuracy confident {unc.get('accuracy_confident')}, "
            f"uncertain {unc.get('accuracy_uncertain')}."
        )
        + "</p>",
    )


def _result_panels(tm: dict, names: list[str], run_dir: Path) -> list[Panel]:
    """The panels read from the test's files: confusion matrix, per-class table, the figures the
    test drew, the calibrators compared and the conformal sets."""
    conf = tm.get("conformal", {})
    panels: list[Panel] = [
        (
            "confusion",
            "Confusion matrix",
            f"<img alt='confusion matrix' src='{png_data_uri(_confusion(tm['confusion_matrix'], names))}'>",
        )
    ]
    per = [
        [
            n,
            tm["precision_per_class"][n],
            tm["recall_per_class"][n],
            tm["f1_per_class"][n],
            conf.get("per_class", {}).get(n, {}).get("coverage", ""),
            conf.get("per_class", {}).get(n, {}).get("mean_set_size", ""),
        ]
        for n in names
    ]
    panels.append(
        ("per_class", "Per-class table", table(["class", "precision", "recall", "F1", "set coverage", "set size"], per))
    )
    for pid, heading, f in (
        ("reliability", "Reliability diagram (15 bins)", run_dir / "reliability.png"),
        ("coverage_curve", "Risk-coverage curve (accuracy of the kept images)", run_dir / "risk_coverage.png"),
    ):
        if f.is_file():
            panels.append((pid, heading, f"<img alt='{pid}' src='{png_data_uri(f)}'>"))
    panels.append(
        (
            "calibrators",
            "Calibrators compared (fitted on validation, scored on test)",
            _calibrators_panel(tm["calibration"]),
        )
    )
    if conf:
        panels.append(
            (
                "conformal",
                f"Conformal prediction sets ({conf.get('method', 'APS')}, level {conf['level']})",
                f"<img alt='conformal' src='{png_data_uri(_conformal_figure(conf))}'>" + _conformal_table(conf),
            )
        )
    return panels


def _tsne_panel(module, ds, idx: list[int], names: list[str], seed: int) -> Panel:
    """The t-SNE of the denoised label vectors (sampling variants), or why there is none."""
    if not module.model.uses_diffusion:
        return (
            "tsne",
            "t-SNE",
            f"<p>The {esc(module.model.variant)} variant has no reverse diffusion: no label-vector trajectory.</p>",
        )
    try:
        fig, _steps = tsne_figure(module, ds, idx, names, seed)
    except ImportError:
        return "tsne", "t-SNE", "<p>scikit-learn is not installed: pip install 'diffmic[report]'.</p>"
    return (
        "tsne",
        f"t-SNE of the denoised label vectors ({len(idx)} test images, paper Fig. 2)",
        f"<img alt='tsne' src='{png_data_uri(fig)}'>",
    )


def _lesions_panel(tm: dict, module, ds, idx: list[int], cfg, run_dir: Path) -> Panel:
    """The explanations against lesion masks: the numbers of test_metrics.json's ``lesions`` block
    (every test image with a mask) where the test wrote one, otherwise computed here on the
    ``--max-images`` subset (and written to ``lesion_hits.json``)."""
    lesions = tm.get("lesions") if isinstance(tm.get("lesions"), dict) else None
    if lesions is None and module.model.uses_dcg:
        lesions = lesion_check(module, ds, idx, cfg)
    if not lesions:
        return "lesions", "Explanations against lesion masks", "<p>No lesion masks for this data set (or no DCG).</p>"
    write_json(run_dir / "lesion_hits.json", lesions)
    lrows = [
        [
            "ROI overlap with lesion (mean fraction of region)",
            lesions.get("roi_overlap"),
            lesions.get("roi_overlap_random"),
        ],
        ["ROI centre on lesion", lesions.get("roi_center_hit"), lesions.get("roi_center_hit_random")],
        ["saliency peak on lesion", lesions["peak_hit"], lesions["peak_hit_random"]],
        ["pointing game (5 px tolerance)", lesions["pointing_hit"], lesions["pointing_hit_random"]],
        ["saliency mass on lesion", lesions["energy_on_lesion"], lesions["lesion_share"]],
    ]
    return (
        "lesions",
        f"Explanations against lesion masks ({lesions['num_images']} test images)",
        table(["measure", "DCG", "random region / point of the same size"], lrows),
    )


def _gallery_panel(gallery: list) -> Panel:
    """The gallery rows (correct / wrong / uncertain ...) of :func:`explanation_gallery` as HTML figures."""
    inner = ""
    for title, figs in gallery:
        inner += f"<h3 style='font-size:13px'>{esc(title)}</h3><div class='gallery'>"
        inner += "".join(
            f"<figure><img alt='{esc(image_id)}' src='{png_data_uri(p)}'><figcaption>{esc(c)}</figcaption></figure>"
            for p, image_id, c in figs
        )
        inner += "</div>"
    return "gallery", "Gallery: saliency and regions on the original images", inner
