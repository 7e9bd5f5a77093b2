"""Serving a trained model: load once, classify many images.

>>> from diffmic.inference import Predictor  # doctest: +SKIP
>>> p = Predictor.from_checkpoint("runs/demo/checkpoints/best.ckpt")  # doctest: +SKIP
"""

from diffmic.inference.predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]
