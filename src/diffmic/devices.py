"""The device a single-process job (calibration, explanation, the Predictor) runs on when the user
names none: the first CUDA GPU when there is one, else the CPU. Training chooses through Lightning's
``accelerator`` instead."""

from __future__ import annotations

import torch

__all__ = ["default_device"]


def default_device() -> torch.device:
    """``cuda`` when ``torch.cuda.is_available()``, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
