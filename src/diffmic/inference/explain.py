"""``diffmic report RUN``: the figures and checks that need the model (t-SNE of the denoised label
vectors, lesion hit rates of the DCG's regions and saliency, a gallery of explanations) and the
self-contained HTML report of a tested run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from diffmic.config import ConfigError, load_config
from diffmic.diffusion.reverse import reverse_sample
from diffmic.reporting.html import png_data_uri, table, write_report
from diffmic.trust.lesions import boxes_to_original, lesion_hits, saliency_to_original


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
def tsne_figure(
    module, dataset, idx: list[int], class_names: list[str], seed: int, num_panels: int = 4, batch_size: int = 64
):
    """The paper's Fig. 2: t-SNE of the denoised label vectors y_t at several reverse steps (one
    sample per image), coloured by the true class. Returns (figure, the steps shown)."""
    from sklearn.manifold import TSNE

    e = module.cfg.eval
    trajs, labels = [], []
    for s in range(0, len(idx), batch_size):
        items = [dataset[i] for i in idx[s : s + batch_size]]
        x = torch.stack([it["image"] for it in items]).to(module.device)
        out = reverse_sample(
            module.model,
            module.schedule,
            x,
            sampler=e.sampler,
            steps=e.steps,
            eta=e.eta,
            start=e.start,
            num_samples=1,
            ids=[it["id"] for it in items],
            seed=e.sample_seed,
            return_trajectory=True,
        )
        trajs.append(torch.stack([t[:, 0] for t in out.trajectory]).cpu())  # [S,B,C]
        labels += [int(it["label"]) for it in items]
    traj = torch.cat(trajs, 1)
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
                ax.scatter(emb[m, 0], emb[m, 1], s=4, label=name)
        ax.set_title(
            f"reverse step {k + 1 if k < S - 1 else 'final'} of {S}" if k < S - 1 else f"final y0 ({S} states)",
            fontsize=8,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=6, markerscale=2, loc="best")
    fig.tight_layout()
    return fig, pick


def _mask_path(cfg, image_id: str) -> Path | None:
    if cfg.data.dataset != "ham10000":
        return None
    p = Path(cfg.data.root) / "masks" / f"{image_id}_segmentation.png"
    return p if p.is_file() else None


def _original_path(cfg, image_id: str) -> Path | None:
    if cfg.data.dataset == "ham10000":
        p = Path(cfg.data.root) / "images" / f"{image_id}.jpg"
        return p if p.is_file() else None
    p = Path(image_id)
    return p if p.is_file() else None


def _load(path: Path, in_chans: int) -> np.ndarray:
    from diffmic.data.transforms import open_image, to_mode

    with open_image(path) as img:
        return np.array(to_mode(img, in_chans))


@torch.no_grad()
def lesion_check(module, dataset, idx: list[int], cfg, batch_size: int = 64) -> dict | None:
    """Mean hit rates of the DCG regions and saliency (true class) over images with a lesion mask."""
    from PIL import Image

    rows = []
    for s in range(0, len(idx), batch_size):
        items = [dataset[i] for i in idx[s : s + batch_size]]
        x = torch.stack([it["image"] for it in items]).to(module.device)
        g = module.model.guide(x)
        for b, it in enumerate(items):
            mp = _mask_path(cfg, it["id"])
            if mp is None:
                continue
            with Image.open(mp) as im:
                mask = np.array(im.convert("L")) > 127
            H, W = mask.shape
            boxes = boxes_to_original(g.roi_boxes[b].cpu().tolist(), W, H, cfg.data.image_size)
            sal, crop = saliency_to_original(g.saliency[b, int(it["label"])].float().cpu().numpy(), W, H)
            rows.append(lesion_hits(mask, boxes, sal, crop))
    if not rows:
        return None
    keys = rows[0].keys()
    return {
        "num_images": len(rows),
        "saliency_class": "true class",
        **{k: float(np.nanmean([r[k] for r in rows if k in r])) for k in keys},
    }


@torch.no_grad()
def explanation_gallery(
    module, dataset, rows: list[dict], cfg, per_row: int, seed: int, out_dir: Path
) -> list[tuple[str, list]]:
    """PNG explanations (original resolution) for correct, wrong and uncertain test images."""
    from PIL import Image

    from diffmic.reporting.overlay import draw_explanation

    index = {it_id: i for i, it_id in enumerate(dataset.ids)} if hasattr(dataset, "ids") else {}
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
    names = list(module.class_names)
    out = []
    for title, sel in groups:
        figs = []
        for r in sel:
            i = index.get(r["id"])
            if i is None:
                continue
            item = dataset[i]
            x = item["image"][None].to(module.device)
            gd = module.model.guide(x) if module.model.uses_dcg else None
            op = _original_path(cfg, r["id"])
            if op is not None:
                img = _load(op, cfg.data.in_chans)
            else:  # the network input, de-normalised
                from diffmic.data.transforms import norm_stats

                mean, std = (torch.tensor(v)[:, None, None] for v in norm_stats(cfg.data.in_chans))
                img = ((item["image"] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            mp = _mask_path(cfg, r["id"])
            mask = None
            if mp is not None:
                with Image.open(mp) as im:
                    mask = np.array(im.convert("L")) > 127
            k = int(r["pred"])
            cap = (
                f"{r['id']}: true {names[int(r['label'])]}, pred {names[k]} p={float(r['confidence']):.2f}"
                + (f", set {{{r['set'].replace('|', ', ')}}}" if r.get("set") else "")
                + (", t-test uncertain" if int(r.get("uncertain", 0)) else "")
            )
            png = out_dir / f"{r['id']}.png"
            draw_explanation(
                img,
                gd.saliency[0, k].float().cpu().numpy() if gd is not None else None,
                gd.roi_boxes[0].cpu().tolist() if gd is not None else None,
                [float(a) for a in gd.roi_attention[0].cpu()] if gd is not None else None,
                cfg.data.image_size,
                f"pred {names[k]}",
                png,
                mask=mask,
            )
            figs.append((png, cap))
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
    ax.set_xticks(range(len(names)), names, fontsize=7, rotation=45)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    return fig


def _conformal_figure(conf: dict):
    plt = _plt()
    per = conf.get("per_class", {})
    names = list(per)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=110)
    axes[0].bar(names, [per[n]["coverage"] for n in names])
    axes[0].axhline(conf["level"], color="C3", ls="--", label=f"level {conf['level']:.2f}")
    axes[0].axhline(conf["coverage"], color="k", lw=0.8, label=f"overall {conf['coverage']:.3f}")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("coverage per true class", fontsize=9)
    axes[0].legend(fontsize=7, loc="lower left")
    axes[1].bar(names, [per[n]["mean_set_size"] for n in names], color="C1")
    axes[1].set_title(f"mean set size (overall {conf['mean_set_size']:.2f})", fontsize=9)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, rotation=45)
    fig.tight_layout()
    return fig


def build_report(run_dir: Path, output: Path | None = None, max_images: int = 600, gallery_size: int = 4) -> Path:
    from diffmic.training.checkpoint import load_module
    from diffmic.training.run import build_datamodule, resolve_checkpoint

    run_dir = Path(run_dir)
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
    cfg = load_config(run_dir / "config.yaml")
    module = load_module(
        resolve_checkpoint(
            run_dir, tm.get("checkpoint") if tm.get("checkpoint") and Path(tm["checkpoint"]).exists() else None
        )
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device).eval()
    dm = build_datamodule(cfg)
    dm.setup("test")
    ds = dm.get_dataset("test")
    names = list(module.class_names)
    seed = cfg.run.seed
    labels = [int(ds[i]["label"]) for i in range(len(ds))] if not hasattr(ds, "labels") else list(ds.labels)
    idx = subset_indices(labels, max_images, seed)
    output = Path(output) if output else run_dir / "report.html"
    fig_dir = run_dir / "report_files"
    fig_dir.mkdir(parents=True, exist_ok=True)

    panels = []
    ci = tm.get("ci", {})

    def with_ci(k, v):
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
    panels.append(
        (
            "metrics",
            "Test metrics with 95 % bootstrap intervals",
            table(["metric", "value", "CI low", "CI high"], head)
            + f"<p>{tm.get('num_images')} test images; calibration: {cal.get('calibrator', 'temperature')} "
            f"(temperature {cal['temperature']:.3f}) fitted on "
            f"{cal.get('fitted_on')}; {tm.get('ci_method', '')}. Referral rule: {ref.get('rule', '')}. "
            f"Uncertainty: {unc.get('method', '')}; accuracy confident {unc.get('accuracy_confident')}, "
            f"uncertain {unc.get('accuracy_uncertain')}.</p>",
        )
    )
    panels.append(
        (
            "confusion",
            "Confusion matrix",
            f"<img alt='confusion matrix' src='{png_data_uri(_confusion(tm['confusion_matrix'], names))}'>",
        )
    )
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
    if conf:
        panels.append(
            (
                "conformal",
                f"Conformal prediction sets ({conf.get('method', 'APS')}, level {conf['level']})",
                f"<img alt='conformal' src='{png_data_uri(_conformal_figure(conf))}'>",
            )
        )
    if module.model.variant != "basic":
        try:
            fig, _steps = tsne_figure(module, ds, idx, names, seed)
            panels.append(
                (
                    "tsne",
                    f"t-SNE of the denoised label vectors ({len(idx)} test images, paper Fig. 2)",
                    f"<img alt='tsne' src='{png_data_uri(fig)}'>",
                )
            )
        except ImportError:
            panels.append(("tsne", "t-SNE", "<p>scikit-learn is not installed: pip install 'diffmic[report]'.</p>"))
    else:
        panels.append(
            ("tsne", "t-SNE", "<p>The basic variant has no reverse diffusion: no label-vector trajectory.</p>")
        )
    lesions = lesion_check(module, ds, idx, cfg) if module.model.uses_dcg else None
    if lesions:
        (run_dir / "lesion_hits.json").write_text(json.dumps(lesions, indent=2))
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
        panels.append(
            (
                "lesions",
                f"Explanations against lesion masks ({lesions['num_images']} test images)",
                table(["measure", "DCG", "random region / point of the same size"], lrows),
            )
        )
    else:
        panels.append(
            ("lesions", "Explanations against lesion masks", "<p>No lesion masks for this data set (or no DCG).</p>")
        )
    gal = explanation_gallery(module, ds, rows, cfg, gallery_size, seed, fig_dir)
    inner = ""
    for title, figs in gal:
        inner += f"<h3 style='font-size:13px'>{title}</h3><div class='gallery'>"
        inner += "".join(
            f"<figure><img alt='{Path(p).stem}' src='{png_data_uri(p)}'><figcaption>{c}</figcaption></figure>"
            for p, c in figs
        )
        inner += "</div>"
    panels.append(("gallery", "Gallery: saliency and regions on the original images", inner))
    return write_report(
        output,
        f"diffmic report: {run_dir}",
        panels,
        intro=f"variant {tm.get('variant')}, sampler {tm.get('sampler')}, K = {tm.get('num_samples')}",
    )
