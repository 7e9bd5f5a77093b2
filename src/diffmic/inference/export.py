"""A portable model folder that loads without Lightning: ``diffmic export --run RUN --out DIR``.

The folder holds

* ``model.safetensors`` — the network's weights (the EMA denoiser when the run evaluates with it),
  keys of :class:`~diffmic.nn.diffmic.DiffMIC`;
* ``config.json`` — everything needed to rebuild and use it: ``format``/``format_version``, the
  diffmic version, the class names, the architecture (``DiffMIC(**architecture)``), the
  preprocessing, the sampler settings, the noise schedule, the fitted calibration when the
  checkpoint has one (``calibration``, passed through as stored), the full training config, and the
  SHA-256 of the weights file (checked on load);
* ``MODEL_CARD.md`` — training data and split, test metrics with their intervals when the run was
  tested, intended use and limits, the paper reference;
* with ``--onnx``: ``encoder_dcg.onnx`` (image -> features ρ(x) and the fused DCG prior) and
  ``denoiser_step.onnx`` (one noise prediction ε(ρ(x), y_t, t, prior)); see :func:`export_onnx`.

:func:`load_model_folder` reads it back with PyTorch, safetensors and the ``nn`` layer only;
:class:`~diffmic.inference.predictor.Predictor` accepts it (``Predictor.load(folder)``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffmic import __version__

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ExportError",
    "PortableModel",
    "export_model",
    "export_onnx",
    "is_model_folder",
    "load_model_folder",
]

FORMAT = "diffmic-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "MODEL_CARD.md"
ONNX_ENCODER = "encoder_dcg.onnx"
ONNX_STEP = "denoiser_step.onnx"
PAPER = (
    "Yang, Y., Fu, H., Aviles-Rivero, A. I., Schönlieb, C.-B., Zhu, L.: DiffMIC: Dual-Guidance "
    "Diffusion Network for Medical Image Classification. MICCAI 2023 (arXiv:2303.10610)."
)


class ExportError(ValueError):
    """The export cannot be written or the model folder cannot be read (the message says why)."""


# ----------------------------------------------------------------------------------------------
# Loading (no Lightning)


class PortableModel(nn.Module):
    """What :class:`Predictor` needs from a trained model: ``model`` (:class:`DiffMIC`), ``cfg``,
    ``class_names``, ``schedule`` (built on the model's device), ``calibration`` (or ``None``)."""

    def __init__(
        self, model: nn.Module, cfg, class_names: list[str], calibration: Any = None, meta: dict | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.class_names = list(class_names)
        self.calibration = calibration
        self.meta = dict(meta or {})
        self._schedule = None

    @property
    def schedule(self):
        from diffmic.diffusion.schedule import NoiseSchedule

        dev = next(self.model.parameters()).device
        s = self._schedule
        if s is None or s.betas.device != dev:
            d = self.cfg.diffusion
            s = NoiseSchedule.build(d.schedule, d.num_timesteps, d.beta_start, d.beta_end).to(dev)
            self._schedule = s
        return s


def is_model_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not (p.is_dir() and (p / CONFIG).is_file()):
        return False
    try:
        return json.loads((p / CONFIG).read_text()).get("format") == FORMAT
    except (ValueError, OSError):
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_model_folder(path: str | os.PathLike, eval_overrides: dict | None = None) -> PortableModel:
    """Rebuild the model of an exported folder (strict weights; eval.* settings may be overridden)."""
    from safetensors.torch import load_file

    from diffmic.config import ConfigError, config_from_dict
    from diffmic.nn.diffmic import DiffMIC

    folder = Path(path)
    cfg_path, weights = folder / CONFIG, folder / WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise ExportError(
            f"'{folder}' is not a diffmic model folder: it needs {CONFIG} and {WEIGHTS} (written by `diffmic export`)"
        )
    try:
        meta = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise ExportError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise ExportError(f"{cfg_path}: not a diffmic model config (format={meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ExportError(
            f"{cfg_path}: format_version {meta['format_version']} is newer than this diffmic "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade diffmic"
        )
    digest = meta.get("weights_sha256")
    if digest and _sha256(weights) != digest:
        raise ExportError(f"{weights}: SHA-256 differs from {CONFIG} (file changed or truncated); re-export it")
    config = dict(meta["config"])
    if eval_overrides:
        bad = set(eval_overrides) - set(config.get("eval", {}))
        if bad:
            raise ExportError(f"unknown eval settings {sorted(bad)}; valid: {sorted(config.get('eval', {}))}")
        config["eval"] = {**config.get("eval", {}), **eval_overrides}
    try:
        cfg = config_from_dict(config, source=str(cfg_path))
    except ConfigError as exc:
        raise ExportError(f"{cfg_path}: {exc}") from exc
    arch = dict(meta["architecture"])
    arch.update(encoder_weights=None, dcg_weights=None, pretrained=None)
    model = DiffMIC(**arch)
    state = load_file(str(weights), device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{weights} does not match the architecture in {CONFIG}: {str(exc)[:600]}") from exc
    model.eval()
    return PortableModel(model, cfg, meta["class_names"], meta.get("calibration"), meta)


# ----------------------------------------------------------------------------------------------
# Writing


def _preprocessing(cfg) -> dict:
    from diffmic.data.transforms import PREPROCESS_VERSION, norm_stats

    mean, std = norm_stats(cfg.data.in_chans)
    return {
        "image_size": cfg.data.image_size,
        "in_chans": cfg.data.in_chans,
        "steps": [
            "convert to RGB (in_chans=3) or grey (in_chans=1)",
            "centre square crop",
            f"bilinear antialiased resize to {cfg.data.image_size}x{cfg.data.image_size}",
            "scale to [0, 1]",
            "normalise with mean/std per channel",
        ],
        "mean": list(mean),
        "std": list(std),
        "layout": "NCHW float32",
        "preprocess_version": PREPROCESS_VERSION,
        "reference": "diffmic.data.transforms.decode_image + build_transform(train=False)",
    }


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _metric_line(name: str, val: Any, ci: Any) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return f"| {name} | {_fmt(val)} | [{_fmt(ci[0])}, {_fmt(ci[1])}] |"
    if isinstance(ci, dict) and {"low", "high"} <= set(ci):
        return f"| {name} | {_fmt(val)} | [{_fmt(ci['low'])}, {_fmt(ci['high'])}] |"
    return f"| {name} | {_fmt(val)} | not computed |"


def _model_card(meta: dict, metrics: dict | None, fit_summary: dict | None) -> str:
    cfg = meta["config"]
    data, model, ev = cfg["data"], cfg["model"], cfg["eval"]
    names = meta["class_names"]
    lines = [
        f"# DiffMIC model card: {data['dataset']} ({len(names)} classes)",
        "",
        f"Exported by diffmic {__version__} on {meta['exported']} from `{meta['source']['checkpoint']}` "
        f"(trained with diffmic {meta['source']['diffmic_version']}).",
        "",
        "## Model",
        "",
        f"DiffMIC variant `{model['variant']}`: image encoder `{model['encoder']}`, DCG streams "
        f"`{model['dcg_global']}` / `{model['dcg_local']}`, denoiser width {model['hidden_dim']}, "
        f"T = {cfg['diffusion']['num_timesteps']} ({cfg['diffusion']['schedule']} schedule). "
        f"Initial backbone weights: {_pretrained_text(model)}.",
        f"Prediction: {ev['sampler']} sampler, {ev['steps']} steps, {ev['num_samples']} sample(s) per image "
        f"({ev['aggregate']}), readout temperature {ev['temperature']}, refer to a clinician below "
        f"confidence {ev['refer_threshold']} or when the samples disagree."
        + (
            f" The predicted class and probabilities come from the deterministic read-out from the prior "
            f"mean in {ev['point_steps']} denoiser calls (eval.point_steps); the samples give the agreement."
            if ev.get("point_steps")
            else ""
        ),
        f"Calibration: {json.dumps(meta['calibration']) if meta.get('calibration') is not None else 'none stored'}.",
        "",
        "Classes (output order): " + ", ".join(f"{i} {n}" for i, n in enumerate(names)),
        "",
        "## Training data",
        "",
        f"Data set `{data['dataset']}` (data.root `{data['root']}`), split `{data['split']}`"
        + (
            f" (test fraction {data['test_fraction']})"
            if data["split"] != "authors"
            else " (the DiffMIC authors' released split)"
        )
        + f", validation fraction {data['val_fraction']} carved from train"
        + (f", stratified subset of {data['subset']} images" if data.get("subset") else "")
        + f", images at {data['image_size']} px, {data['in_chans']} channel(s).",
    ]
    if data["dataset"] == "ham10000" and data["split"] == "authors":
        lines.append(
            "Note: the authors' HAM10000 split is per image, and about a third of its test images show "
            "a lesion that is also in the training split, so test scores on it are optimistic."
        )
    if fit_summary:
        lines.append(
            f"Training: {fit_summary.get('epochs')} epochs, checkpoint selected on "
            f"{fit_summary.get('selected_on')} {fit_summary.get('monitor')} "
            f"(score {_fmt(fit_summary.get('best_score'))})."
        )
    lines += ["", "## Test metrics", ""]
    if metrics:
        ci = metrics.get("ci") or metrics.get("intervals") or {}
        lines += [
            f"Test split, {metrics.get('num_images', '?')} images, sampler {metrics.get('sampler')} "
            f"{metrics.get('steps')} steps ({metrics.get('checkpoint', '')}).",
            "",
            "| metric | value | 95% interval |",
            "|---|---|---|",
        ]
        for k in ("acc", "balanced_acc", "f1", "kappa", "auroc"):
            if k in metrics:
                lines.append(_metric_line(k, metrics[k], ci.get(k) if isinstance(ci, dict) else None))
        ref = metrics.get("referral")
        if isinstance(ref, dict):
            lines += [
                "",
                f"Referral: {_fmt(ref.get('referred_fraction'))} of test images referred; accuracy on "
                f"the rest {_fmt(ref.get('accuracy_kept'))}, on the referred {_fmt(ref.get('accuracy_referred'))}.",
            ]
    else:
        lines.append(
            "No test_metrics.json in the run folder: this model was not evaluated on a test split "
            "(run `diffmic test --run RUN` before exporting)."
        )
    lines += [
        "",
        "## Intended use and limits",
        "",
        "Research on medical image classification and its uncertainty. **Not a medical device**: it is not "
        "validated for diagnosis or treatment decisions and must not replace a clinician. Predictions are "
        "only meaningful for images like the training data (same modality, acquisition and population); "
        "the referral flag marks low-confidence cases but does not catch every error or out-of-distribution "
        "input. Scores from one data set and split do not transfer to other sites. Check the licence of the "
        "training data (HAM10000: CC BY-NC 4.0, non-commercial) before any use.",
        "",
        "## Files",
        "",
        f"`{WEIGHTS}` (weights, SHA-256 `{meta['weights_sha256']}`), `{CONFIG}` (architecture, preprocessing, "
        "sampler, class names), this card"
        + (", ONNX graphs (see config.json `onnx`)" if meta.get("onnx") else "")
        + ". Load with `diffmic.inference.Predictor.load(folder)`; no Lightning needed.",
        "",
        "## Reference",
        "",
        PAPER,
        "",
    ]
    return "\n".join(lines)


def _pretrained_text(model: dict) -> str:
    p = model.get("pretrained")
    if model.get("encoder_weights") or model.get("dcg_weights"):
        return "local weight files (model.encoder_weights / model.dcg_weights)"
    if p is True:
        return "ImageNet (torchvision/timm)"
    if p:
        return f"local file `{Path(str(p)).name}`"
    return "random initialisation"


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # own, contiguous copies: safetensors refuses tensors that share memory
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def export_model(
    run: str | os.PathLike | None = None,
    ckpt: str | os.PathLike | None = None,
    out: str | os.PathLike = "",
    onnx: bool = False,
    onnx_batch: int = 2,
) -> Path:
    """Write the portable folder ``out`` from a run (best checkpoint) or a checkpoint file.

    ``out`` must not exist or be empty (nothing is overwritten); the folder is assembled next to it
    and renamed into place at the end, so a failed export leaves nothing behind.
    """
    from safetensors.torch import save_file

    from diffmic.training.checkpoint import load_module, read_checkpoint
    from diffmic.training.run import resolve_checkpoint

    if not run and not ckpt:
        raise ExportError("export needs --run RUN (or --ckpt FILE)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"'{out}' already exists and is not empty; choose a new --out folder (nothing was written)")
    ckpt_path = resolve_checkpoint(Path(run), str(ckpt) if ckpt else None) if run else Path(ckpt)
    raw = read_checkpoint(ckpt_path)
    hp = raw["hyper_parameters"]
    module = load_module(ckpt_path)  # EMA weights applied when the run evaluates with them
    model = module.model.eval()
    run_dir = Path(run) if run else ckpt_path.parent.parent
    metrics = _read_json(run_dir / "test_metrics.json")
    fit_summary = _read_json(run_dir / "fit_summary.json")
    calibration = raw.get(
        "diffmic_calibration", raw.get("calibration", hp.get("calibration"))
    )  # training.checkpoint.CALIBRATION_KEY
    train_config = dict(hp["config"])
    arch = dict(model.hparams)
    arch.update(encoder_weights=None, dcg_weights=None, pretrained=None)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(_tensors(model), str(tmp / WEIGHTS), metadata={"format": FORMAT, "diffmic_version": __version__})
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "diffmic_version": __version__,
            "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "class_names": list(module.class_names),
            "num_classes": int(module.num_classes),
            "architecture": arch,
            "preprocessing": _preprocessing(module.cfg),
            "sampler": dict(train_config["eval"]),
            "diffusion": dict(train_config["diffusion"]),
            "calibration": calibration,
            "weights": WEIGHTS,
            "weights_sha256": _sha256(tmp / WEIGHTS),
            "ema": bool(module.cfg.train.use_ema and "diffmic_ema" in raw),
            "source": {
                "checkpoint": str(ckpt_path),
                "diffmic_version": raw.get("diffmic_version", "unknown"),
                "epoch": raw.get("epoch"),
                "global_step": raw.get("global_step"),
            },
            "config": train_config,
        }
        if onnx:
            meta["onnx"] = export_onnx(model, module.cfg, tmp, batch=onnx_batch)
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2, default=str))
        (tmp / CARD).write_text(_model_card(meta, metrics, fit_summary))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except ValueError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc}); fix or delete it before exporting") from exc
    return obj if isinstance(obj, dict) else None


# ----------------------------------------------------------------------------------------------
# ONNX


class _EncoderDCG(nn.Module):
    """``image [B, C_in, H, W] -> (features ρ(x) [B, hidden], prior [B, C])`` (prior: fused DCG prior; zeros
    for variants without DCG)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.model.encode(image)
        pri = self.model.priors(self.model.guide(image), image.shape[0], image.device, image.dtype)
        return feat, pri.fused


class _DenoiserStep(nn.Module):
    """``(features [B, hidden], y_t [B, C], t [B] int64, prior [B, C]) -> ε [B, C]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, feat: torch.Tensor, y_t: torch.Tensor, t: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        return self.model.eps(feat, y_t, t, prior if self.model.uses_guidance else None)


def export_onnx(model: nn.Module, cfg, folder: str | os.PathLike, batch: int = 2, opset: int = 18) -> dict:
    """Write :data:`ONNX_ENCODER` and :data:`ONNX_STEP` into ``folder`` (fixed batch size ``batch``:
    the DCG's top-K ROI crops are traced for it). Needs the ``onnx`` extra (onnx, onnxscript)."""
    if model.variant == "basic":
        raise ExportError(
            "ONNX export covers the diffusion variants (C1, C2, full); variant 'basic' is a plain "
            "classifier: export it with torch.onnx.export(model.encoder + model.classifier)"
        )
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise ExportError("--onnx needs the 'onnx' extra: pip install 'diffmic[onnx]'") from exc
    folder = Path(folder)
    s, c_in, n = cfg.data.image_size, cfg.data.in_chans, model.num_classes
    image = torch.zeros(batch, c_in, s, s)
    model = model.eval().to("cpu")
    enc = _EncoderDCG(model).eval()
    step = _DenoiserStep(model).eval()
    with torch.no_grad():
        feat, prior = enc(image)
        args = (feat, prior.clone(), torch.full((batch,), 10, dtype=torch.long), prior)
        torch.onnx.export(
            enc,
            (image,),
            str(folder / ONNX_ENCODER),
            input_names=["image"],
            output_names=["features", "prior"],
            opset_version=opset,
            dynamo=False,
        )
        torch.onnx.export(
            step,
            args,
            str(folder / ONNX_STEP),
            input_names=["features", "y_t", "t", "prior"],
            output_names=["eps"],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={k: {0: "batch"} for k in ("features", "y_t", "t", "prior", "eps")},
        )
    return {
        "encoder_dcg": {
            "file": ONNX_ENCODER,
            "inputs": {"image": [batch, c_in, s, s]},
            "outputs": {"features": [batch, int(feat.shape[1])], "prior": [batch, n]},
            "note": "fixed batch size; the input is the preprocessed image (see preprocessing)",
        },
        "denoiser_step": {
            "file": ONNX_STEP,
            "inputs": {"features": ["B", int(feat.shape[1])], "y_t": ["B", n], "t": ["B"], "prior": ["B", n]},
            "outputs": {"eps": ["B", n]},
            "note": "t is int64 in [0, T); run the sampler (config sampler/diffusion) around it",
        },
        "opset": opset,
    }
