"""Classify new images from a checkpoint: probability, uncertainty, referral flag, saliency and ROIs.

Usage (run by ``tests/test_doc_examples.py`` on a tiny checkpoint)::

    from diffmic.inference import Predictor

    p = Predictor.from_checkpoint("runs/demo/checkpoints/best.ckpt")
    results = p.predict(["lesion.jpg"])
    print(results[0].label, results[0].confidence, results[0].refer)

``Predictor.from_pretrained("org/name")`` loads an exported model folder from the Hugging Face Hub.
``fast=True`` (``diffmic predict --fast``) skips the K reverse samples: the same prediction,
calibrated probabilities, prediction set, referral threshold and out-of-distribution flag, without
the sample agreement, spread and t-test (:meth:`Predictor.set_fast`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, cast

import numpy as np
import torch
from torch import Tensor

from diffmic.devices import default_device
from diffmic.diffusion.reverse import reverse_sample
from diffmic.metrics import readout, should_refer
from diffmic.trust.evaluate import applied_rule, predict_trust
from diffmic.trust.ood import OODInputs, classifier_outputs
from diffmic.trust.ood import rule_text as ood_rule_text
from diffmic.trust.rows import prediction_row

if TYPE_CHECKING:
    from diffmic.nn.guidance import GuidanceOutput


@dataclass
class Prediction:
    """One image's result.

    ``refer`` is True when the model is not confident enough to act on alone: the probability of
    the predicted class is below ``refer_threshold`` or the K reverse samples disagree (with a
    calibrated checkpoint: below the fitted threshold, or ``ood``: the image does not look like the
    training data, whatever its confidence); :attr:`Predictor.referral_rule` states the rule applied.
    ``saliency`` is the DCG saliency map of the predicted class ([h, w], upsampled to the input by
    :meth:`Predictor.saliency_image`); ``roi_boxes`` are the K crops (y0, x0, y1, x1) in pixels of
    the network input, with their gated-attention weights.
    """

    id: str
    label: str
    label_index: int
    probs: dict[str, float]
    confidence: float
    agreement: Optional[float]
    spread: Optional[float]
    entropy: float
    refer: bool
    prior_probs: Optional[dict[str, float]] = None
    saliency: Optional[np.ndarray] = None
    roi_boxes: Optional[list[list[int]]] = None
    roi_attention: Optional[list[float]] = None
    extra: dict = field(default_factory=dict)
    # with a calibrated checkpoint (diffmic calibrate): confidence/probs are temperature-scaled,
    # refer follows the fitted threshold, and these hold the rest (docs/uncertainty.md)
    confidence_unscaled: Optional[float] = None
    prediction_set: Optional[list[str]] = None
    uncertain: Optional[bool] = None  # CARD paired t-test of the two top classes (K >= 2)
    ttest_p: Optional[float] = None
    # out-of-distribution flag (trust.ood; with a calibration that holds one): True = the image does
    # not look like the training data, and it is referred whatever its confidence
    ood: Optional[bool] = None
    ood_score: Optional[float] = None

    def as_row(self) -> dict:
        """The image's row of ``diffmic predict``'s CSV (:func:`diffmic.trust.rows.prediction_row`)."""
        return prediction_row(
            self.id,
            list(self.probs),
            list(self.probs.values()),
            layout="predict",
            label=self.label,
            pred=self.label_index,
            confidence=self.confidence,
            readout=(self.agreement, self.spread, self.entropy),
            refer=self.refer,
            confidence_unscaled=self.confidence_unscaled,
            prediction_set=self.prediction_set,
            ttest_p=self.ttest_p,
            uncertain=self.uncertain,
            ood=(self.ood_score, self.ood) if self.ood is not None and self.ood_score is not None else None,
            roi_boxes=self.roi_boxes,
        )


def pixel_key(x: Tensor) -> str:
    """A hex digest of an image's decoded, preprocessed pixels (the prediction's noise seed)."""
    import hashlib

    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


#: how a model folder is run: ``torch`` (the PyTorch network) or ``onnx`` (its ONNX graphs, ONNX Runtime)
BACKENDS: tuple[str, ...] = ("torch", "onnx")


def _backend(backend: str) -> str:
    if backend not in BACKENDS:
        from diffmic.inference.export import ExportError

        raise ExportError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


class FastPathError(ValueError):
    """The fast path cannot keep this model's outputs (:meth:`Predictor.set_fast`)."""


class Predictor:
    """Load a trained model once and classify many images (CPU or GPU, any batch size)."""

    #: True: no reverse samples are drawn (:meth:`set_fast`)
    fast: bool = False

    def __init__(self, module, device: Optional[torch.device | str] = None) -> None:
        if device is None:
            device = default_device()
        self.module = module.to(device).eval()
        self.device = torch.device(device)
        self.cfg = module.cfg
        self.class_names = list(module.class_names)
        calib = getattr(module, "calibration", None)
        #: the out-of-distribution flag in words, or why there is none (a calibration without one)
        self.ood_rule: Optional[str] = ood_rule_text(calib.get("ood")) if calib is not None else None
        fitted = calib.get("referral") if calib is not None else None
        #: the confidence threshold applied (fitted on validation when calibrated, else eval.refer_threshold)
        self.refer_threshold: float = (
            float(fitted["threshold"]) if isinstance(fitted, dict) else float(self.cfg.eval.refer_threshold)
        )
        self._state_rule()

    def _state_rule(self) -> None:
        model = getattr(self.module, "model", None)
        draws = model is None or model.uses_diffusion
        k = int(self.cfg.eval.num_samples) if draws and not self.fast else None
        #: the referral rule applied to every prediction, in words (diffmic.metrics.referral_rule)
        self.referral_rule: str = applied_rule(
            getattr(self.module, "calibration", None), self.cfg.eval.refer_threshold, k
        )

    def set_fast(self, enabled: bool = True) -> Predictor:
        """The fast path: draw no reverse samples, only the deterministic point read-out
        (``eval.point_steps`` calls of the denoiser), which is the prediction either way. The class,
        the probabilities, their calibration, the prediction set, the fitted referral threshold and the
        out-of-distribution flag are the ones of the full path (they do not use the samples); the
        sample agreement, spread and CARD t-test are not computed, and without a calibration the
        referral rule is the confidence threshold alone (:attr:`referral_rule` says so).

        Raises :class:`FastPathError` where the fast path would change an output: a model whose
        prediction is the mean of its samples (``eval.point_steps=0``), or whose stored
        out-of-distribution flag scores the samples' spread. A classifier (``basic``, ``dcg``) draws
        no samples anyway. Returns ``self``."""
        if enabled:
            model = self.module.model
            if model.uses_diffusion and int(self.cfg.eval.point_steps) <= 0:
                raise FastPathError(
                    "--fast needs the deterministic read-out, but this model's prediction is the mean of its "
                    f"{int(self.cfg.eval.num_samples)} reverse samples (eval.point_steps=0); run without --fast, or "
                    "predict with eval.point_steps=N (then `diffmic calibrate` the model for that read-out)"
                )
            calib = getattr(self.module, "calibration", None)
            ood = calib.get("ood") if isinstance(calib, dict) else None
            if model.uses_diffusion and isinstance(ood, dict) and ood.get("score") == "spread":
                raise FastPathError(
                    "--fast draws no reverse samples, but this model's out-of-distribution flag scores their "
                    "spread; run without --fast (or `diffmic calibrate` with eval.ood_score=mahalanobis or energy)"
                )
        self.fast = bool(enabled)
        self._state_rule()
        return self

    @classmethod
    def from_checkpoint(cls, path: str | Path, device=None, fast: bool = False, **eval_overrides) -> Predictor:
        """From a checkpoint written by ``diffmic fit``, without Lightning: the network is rebuilt from
        the recorded config and loaded strictly, the EMA weights where the run evaluates with them
        (:func:`diffmic.training.loading.load_network`, the checks of ``load_module``)."""
        from diffmic.inference.export import PortableModel
        from diffmic.training.loading import load_network

        over = {"eval": eval_overrides} if eval_overrides else None
        net = load_network(path, overrides=over)
        meta = {"loaded_from": net.loaded_from, "diffmic_version": net.diffmic_version}
        return cls(PortableModel(net.model, net.cfg, net.class_names, net.calibration, meta), device=device).set_fast(
            fast
        )

    @classmethod
    def load(
        cls, path: str | Path, device=None, backend: str = "torch", fast: bool = False, **eval_overrides
    ) -> Predictor:
        """From a model folder written by ``diffmic export`` (no Lightning needed), a run folder
        (its best checkpoint) or a checkpoint file.

        ``backend="onnx"``: a model folder exported with ``--onnx``, served by its ONNX graphs with ONNX
        Runtime on the CPU (:mod:`diffmic.inference.onnx_backend`; neither timm nor torchvision is
        imported); ``"torch"`` (default) rebuilds the PyTorch network. ``fast``: :meth:`set_fast`."""
        from diffmic.inference.export import ExportError, is_model_folder, load_model_folder

        p = Path(path)
        if _backend(backend) == "onnx":
            if not is_model_folder(p):
                raise ExportError(
                    f"backend 'onnx' serves an exported model folder with ONNX graphs (`diffmic export --onnx`); "
                    f"'{p}' is not one"
                )
            from diffmic.inference.onnx_backend import load_onnx_folder, onnx_device

            return cls(load_onnx_folder(p, eval_overrides or None), device=onnx_device(device)).set_fast(fast)
        if is_model_folder(p):
            return cls(load_model_folder(p, eval_overrides or None), device=device).set_fast(fast)
        if p.is_dir():
            from diffmic.training.loading import resolve_checkpoint

            p = resolve_checkpoint(p, None)
        return cls.from_checkpoint(p, device=device, fast=fast, **eval_overrides)

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        revision: Optional[str] = None,
        *,
        cache_dir: Optional[str | Path] = None,
        local_files_only: bool = False,
        token: Optional[str | bool] = None,
        device=None,
        backend: str = "torch",
        fast: bool = False,
        **eval_overrides,
    ) -> Predictor:
        """From an exported model folder on the Hugging Face Hub (``"org/name"``; ``revision`` pins a
        branch, tag or commit) or on disk. The Hub folder is fetched into the Hugging Face cache
        (offline: the cached snapshot) and loaded with every check of :meth:`load`, the weights'
        SHA-256 included (see :mod:`diffmic.inference.hub`); ``backend`` and ``fast`` as for :meth:`load`."""
        from diffmic.inference.export import load_model_folder
        from diffmic.inference.hub import resolve_model

        use = _backend(backend)
        folder = resolve_model(model, revision, cache_dir, local_files_only, token)
        if use == "onnx":
            from diffmic.inference.onnx_backend import load_onnx_folder, onnx_device

            return cls(load_onnx_folder(folder, eval_overrides or None), device=onnx_device(device)).set_fast(fast)
        return cls(load_model_folder(folder, eval_overrides or None), device=device).set_fast(fast)

    def _load_images(self, images: Sequence) -> tuple[Tensor, list[str]]:
        x, ids, _ = self._load_images_seeded(images)
        return x, ids

    def _load_images_seeded(self, images: Sequence) -> tuple[Tensor, list[str], list[str]]:
        """The batch, the ids (paths as given) and the noise keys: a hash of each image's decoded
        pixels, so that the same pixels get the same answer however the path is spelled."""
        from diffmic.data.datasets import ImagePathsDataset

        paths = [Path(p) for p in images]
        ds = ImagePathsDataset(paths, image_size=self.cfg.data.image_size, in_chans=self.cfg.data.in_chans)
        items = [ds[i] for i in range(len(ds))]
        x = torch.stack([it["image"] for it in items])
        keys = [pixel_key(it["image"]) for it in items]
        return x, [str(p) for p in paths], keys

    @torch.no_grad()
    def predict_tensor(
        self, x: Tensor, ids: Sequence[str], seed_keys: Optional[Sequence[str]] = None
    ) -> list[Prediction]:
        """Classify a normalised batch ``x [B,3,H,W]``; ``seed_keys`` (default: ``ids``) seed each
        image's sampling noise."""
        m = self.module
        e = self.cfg.eval
        x = x.to(self.device)
        guidance: Optional[GuidanceOutput]
        prior: Optional[Tensor]
        if not m.model.uses_diffusion:  # a classifier (basic, dcg): no sampling
            logits, feat, _ = classifier_outputs(m.model, x)
            probs = torch.softmax(logits, -1)
            y0 = probs.log()[:, None, :]
            r = readout(y0, "mean", 1.0)
            guidance, prior = None, None
            ood_inputs = OODInputs(logits, feat)
        else:
            out = reverse_sample(
                m.model,
                m.schedule,
                x,
                **e.reverse_kwargs(),
                ids=list(seed_keys if seed_keys is not None else ids),
                draw_samples=not self.fast,
            )
            r = readout(out.y0, e.aggregate, e.temperature, point=out.point)
            # ReverseOutput (diffusion, below nn) cannot name the DCG's output type
            guidance, prior = cast("Optional[GuidanceOutput]", out.guidance), out.prior
            ood_inputs = OODInputs(
                guidance.z_fused if guidance is not None else None,
                out.feat,
                r.spread if out.y0.shape[1] >= 2 else None,
            )
        trust = predict_trust(
            r.probs,
            r.samples if m.model.uses_diffusion or m.model.uses_dcg else None,  # not `basic`
            getattr(m, "calibration", None),
            ids=[str(i) for i in ids],
            ood_inputs=ood_inputs,
        )
        sampled = m.model.uses_diffusion and not self.fast  # agreement / spread mean something
        results = []
        for i, image_id in enumerate(ids):
            k = int(r.pred[i])
            if trust.get("probs") is not None:  # the calibrated arg-max (vector / matrix scaling may move it)
                k = int(trust["probs"][i].argmax())
            res = Prediction(
                id=str(image_id),
                label=self.class_names[k],
                label_index=k,
                probs={n: float(r.probs[i, c]) for c, n in enumerate(self.class_names)},
                confidence=float(r.confidence[i]),
                agreement=float(r.agreement[i]) if sampled or not m.model.uses_diffusion else None,
                spread=float(r.spread[i]) if sampled or not m.model.uses_diffusion else None,
                entropy=float(r.entropy[i]),
                refer=should_refer(
                    float(r.confidence[i]), float(r.agreement[i]) if sampled else None, e.refer_threshold
                ),
            )
            if trust.get("probs") is not None:
                res.confidence_unscaled = res.confidence
                res.probs = {n: float(trust["probs"][i, c]) for c, n in enumerate(self.class_names)}
                res.confidence = float(trust["probs"][i, k])
                res.refer = bool(trust["refer"][i])
                res.prediction_set = [n for c, n in enumerate(self.class_names) if trust["sets"][i, c]]
            if trust.get("ood") is not None:
                res.ood = bool(trust["ood"][i])
                res.ood_score = float(trust["ood_score"][i])
            if trust.get("uncertain") is not None:
                res.uncertain = bool(trust["uncertain"][i])
                res.ttest_p = float(trust["p_value"][i])
            if prior is not None:
                res.prior_probs = {n: float(prior[i, c]) for c, n in enumerate(self.class_names)}
            if guidance is not None:
                res.saliency = guidance.saliency[i, k].float().cpu().numpy()
                res.roi_boxes = guidance.roi_boxes[i].cpu().long().tolist()
                res.roi_attention = [float(a) for a in guidance.roi_attention[i].cpu()]
            results.append(res)
        return results

    def predict(self, images: Sequence[str | Path], batch_size: int = 32) -> list[Prediction]:
        """Classify image files (any size/mode; preprocessed exactly as in training)."""
        results: list[Prediction] = []
        images = list(images)
        for start in range(0, len(images), batch_size):
            x, ids, keys = self._load_images_seeded(images[start : start + batch_size])
            results.extend(self.predict_tensor(x, ids, seed_keys=keys))
        return results

    def display_image(self, image: str | Path):
        """The model's input for ``image`` (cropped, resized) un-normalised to [0, 1], ``[S, S, C]``,
        with the statistics the data layer normalised it with (grey ones for ``in_chans=1``)."""
        from diffmic.data.datasets import ImagePathsDataset
        from diffmic.data.transforms import norm_stats

        ds = ImagePathsDataset([Path(image)], image_size=self.cfg.data.image_size, in_chans=self.cfg.data.in_chans)
        x = ds[0]["image"]
        mean, std = (torch.tensor(v, dtype=x.dtype).view(-1, 1, 1) for v in norm_stats(x.shape[0]))
        return (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()

    def save_explanation(self, image: str | Path, result: Prediction, out_path: str | Path) -> Path:
        """Write a PNG on the original image at its full resolution: the ROI boxes, and the
        saliency map of the predicted class over the square the network sees."""
        from diffmic.data.transforms import open_image, to_mode
        from diffmic.reporting.overlay import draw_explanation

        with open_image(image) as img:
            arr = np.array(to_mode(img, self.cfg.data.in_chans))
        title = f"{result.label} p={result.confidence:.2f}" + (" REFER" if result.refer else "")
        if result.ood:
            title += " (not like the training data)"
        if result.prediction_set is not None:
            title += "  set {" + ", ".join(result.prediction_set) + "}"
        return draw_explanation(
            arr, result.saliency, result.roi_boxes, result.roi_attention, self.cfg.data.image_size, title, out_path
        )

    def save_explanation_input(self, image: str | Path, result: Prediction, out_path: str | Path) -> Path:
        """Write a PNG: the input, the saliency map of the predicted class, and the ROI boxes."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle

        img = self.display_image(image)
        fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
        axes[0].imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)
        axes[0].set_title(f"{result.label} p={result.confidence:.2f}" + (" REFER" if result.refer else ""))
        if result.roi_boxes:
            weights: list[Optional[float]] = [None] * len(result.roi_boxes)
            if result.roi_attention:
                weights = list(result.roi_attention)
            for box, a in zip(result.roi_boxes, weights):
                y0, x0, y1, x1 = box
                axes[0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", lw=1.5))
                if a is not None:
                    axes[0].text(x0, y0, f"{a:.2f}", color="yellow", fontsize=6, va="bottom")
        if result.saliency is not None:
            axes[1].imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)
            sal = torch.nn.functional.interpolate(
                torch.as_tensor(result.saliency)[None, None], size=img.shape[:2], mode="bilinear", align_corners=False
            )[0, 0].numpy()
            axes[1].imshow(sal, alpha=0.5, cmap="jet")
            axes[1].set_title("DCG saliency (predicted class)")
        for ax in axes:
            ax.axis("off")
        fig.tight_layout()
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        from diffmic.outputs import EXPLAIN_TAG

        fig.savefig(out_path, dpi=100, metadata={EXPLAIN_TAG[0]: EXPLAIN_TAG[1]})
        plt.close(fig)
        return out_path
