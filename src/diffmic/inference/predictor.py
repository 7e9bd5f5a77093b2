"""Classify new images from a checkpoint: probability, uncertainty, referral flag, saliency and ROIs.

>>> from diffmic.inference import Predictor
>>> p = Predictor.from_checkpoint("runs/demo/checkpoints/best.ckpt")
>>> results = p.predict(["lesion.jpg"])
>>> results[0].label, results[0].confidence, results[0].refer
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from diffmic.diffusion.reverse import reverse_sample
from diffmic.metrics import readout, should_refer


@dataclass
class Prediction:
    """One image's result.

    ``refer`` is True when the model is not confident enough to act on alone: the probability of
    the predicted class is below ``refer_threshold`` or the K reverse samples disagree.
    ``saliency`` is the DCG saliency map of the predicted class ([h, w], upsampled to the input by
    :meth:`Predictor.saliency_image`); ``roi_boxes`` are the K crops (y0, x0, y1, x1) in pixels of
    the network input, with their gated-attention weights.
    """

    id: str
    label: str
    label_index: int
    probs: dict[str, float]
    confidence: float
    agreement: float
    spread: float
    entropy: float
    refer: bool
    prior_probs: Optional[dict[str, float]] = None
    saliency: Optional[np.ndarray] = None
    roi_boxes: Optional[list[list[int]]] = None
    roi_attention: Optional[list[float]] = None
    extra: dict = field(default_factory=dict)

    def as_row(self) -> dict:
        row = {
            "id": self.id, "pred": self.label_index, "label": self.label, "confidence": self.confidence,
            "agreement": self.agreement, "spread": self.spread, "entropy": self.entropy, "refer": int(self.refer),
        }
        row.update({f"p_{k}": v for k, v in self.probs.items()})
        if self.roi_boxes is not None:
            row["roi_boxes"] = ";".join(",".join(str(int(v)) for v in box) for box in self.roi_boxes)
        return row


class Predictor:
    """Load a trained model once and classify many images (CPU or GPU, any batch size)."""

    def __init__(self, module, device: Optional[torch.device | str] = None) -> None:
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.module = module.to(device).eval()
        self.device = torch.device(device)
        self.cfg = module.cfg
        self.class_names = list(module.class_names)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device=None, **eval_overrides) -> "Predictor":
        from diffmic.training.checkpoint import load_module

        over = {"eval": eval_overrides} if eval_overrides else None
        return cls(load_module(path, overrides=over), device=device)

    def _load_images(self, images: Sequence) -> tuple[Tensor, list[str]]:
        from diffmic.data.datamodule import ImagePathsDataset

        paths = [Path(p) for p in images]
        ds = ImagePathsDataset(paths, image_size=self.cfg.data.image_size, in_chans=self.cfg.data.in_chans)
        items = [ds[i] for i in range(len(ds))]
        x = torch.stack([it["image"] for it in items])
        return x, [str(p) for p in paths]

    @torch.no_grad()
    def predict_tensor(self, x: Tensor, ids: Sequence[str]) -> list[Prediction]:
        """Classify a normalised batch ``x [B,3,H,W]``; ``ids`` seed each image's sampling noise."""
        m = self.module
        e = self.cfg.eval
        x = x.to(self.device)
        if m.model.variant in ("basic", "dcg"):
            probs = torch.softmax(m.model.classify(x), -1)
            y0 = probs.log()[:, None, :]
            r = readout(y0, "mean", 1.0)
            guidance, prior = None, None
        else:
            out = reverse_sample(
                m.model, m.schedule, x, sampler=e.sampler, steps=e.steps, eta=e.eta, start=e.start,
                num_samples=e.num_samples, ids=list(ids), seed=e.sample_seed,
            )
            r = readout(out.y0, e.aggregate, e.temperature)
            guidance, prior = out.guidance, out.prior
        results = []
        for i, image_id in enumerate(ids):
            k = int(r.pred[i])
            res = Prediction(
                id=str(image_id),
                label=self.class_names[k],
                label_index=k,
                probs={n: float(r.probs[i, c]) for c, n in enumerate(self.class_names)},
                confidence=float(r.confidence[i]),
                agreement=float(r.agreement[i]),
                spread=float(r.spread[i]),
                entropy=float(r.entropy[i]),
                refer=should_refer(float(r.confidence[i]), float(r.agreement[i]), e.refer_threshold),
            )
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
            x, ids = self._load_images(images[start : start + batch_size])
            results.extend(self.predict_tensor(x, ids))
        return results

    def save_explanation(self, image: str | Path, result: Prediction, out_path: str | Path) -> Path:
        """Write a PNG: the input, the saliency map of the predicted class, and the ROI boxes."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle

        from diffmic.data.datamodule import ImagePathsDataset

        ds = ImagePathsDataset([Path(image)], image_size=self.cfg.data.image_size, in_chans=self.cfg.data.in_chans)
        x = ds[0]["image"]
        mean = torch.tensor([0.485, 0.456, 0.406])[: x.shape[0], None, None]
        std = torch.tensor([0.229, 0.224, 0.225])[: x.shape[0], None, None]
        img = (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
        axes[0].imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)
        axes[0].set_title(f"{result.label} p={result.confidence:.2f}" + (" REFER" if result.refer else ""))
        if result.roi_boxes:
            for box, a in zip(result.roi_boxes, result.roi_attention or [None] * len(result.roi_boxes)):
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
        fig.savefig(out_path, dpi=100)
        plt.close(fig)
        return out_path
