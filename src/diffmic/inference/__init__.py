"""Serving a trained model: load once, classify many images.

Usage (run by ``tests/test_doc_examples.py``)::

    from diffmic.inference import Predictor

    p = Predictor.from_checkpoint("runs/demo/checkpoints/best.ckpt")
"""

from diffmic.inference.predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]
