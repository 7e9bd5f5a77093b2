"""The usage examples in the package's docstrings run as written.

Examples that need files a user has (a trained checkpoint, an image) are ``::`` code blocks in the
docstring; this test runs each block in a folder that holds those files, made from an untrained tiny
model. Examples that need nothing are ``>>>`` doctests, run by pytest's ``--doctest-modules`` over
``src/diffmic`` (pyproject's testpaths).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffmic.inference
import diffmic.inference.predictor

from _helpers import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")


def code_blocks(doc: str) -> list[str]:
    """The literal blocks (the indented lines after a line ending in ``::``) of a docstring."""
    blocks = []
    for m in re.finditer(r"::\n\n((?:(?: {4}.*)?\n)+)", doc + "\n"):
        blocks.append(textwrap.dedent(m.group(1)).strip())
    return blocks


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    """The files the examples name: ``runs/demo/checkpoints/best.ckpt`` (an untrained tiny model)
    and ``lesion.jpg``."""
    from diffmic.config import load_config
    from diffmic.training.module import DiffMICModule

    root = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    cfg = load_config("cpu_v1", [*TINY_MODEL, "data.image_size=32", "eval.steps=3", "eval.num_samples=2"])
    names = ["benign", "malignant"]
    ckpt = root / "runs" / "demo" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    hp = {"config": cfg.to_dict(), "num_classes": 2, "class_names": names}
    torch.save({"state_dict": DiffMICModule(cfg.to_dict(), 2, names).state_dict(), "hyper_parameters": hp}, ckpt)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(root / "lesion.jpg")
    return root


@pytest.mark.parametrize("module", [diffmic.inference, diffmic.inference.predictor], ids=lambda m: m.__name__)
def test_the_usage_example_runs_as_written(module, user_folder, monkeypatch, capsys):
    blocks = code_blocks(module.__doc__)
    assert blocks, f"{module.__name__} has no usage example"
    monkeypatch.chdir(user_folder)
    for code in blocks:
        namespace: dict = {}
        exec(compile(code, f"<{module.__name__} docstring>", "exec"), namespace)
        assert isinstance(namespace["p"], diffmic.inference.Predictor)
    if "print(" in "".join(blocks):  # the printed label is a class, then a confidence and the flag
        label, confidence, refer = capsys.readouterr().out.split()
        assert label in ("benign", "malignant") and 0.5 <= float(confidence) <= 1 and refer in ("True", "False")
