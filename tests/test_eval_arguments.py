"""One way from ``cfg.eval`` to the sampler: the report's trajectories (inference.explain), the
Predictor and ``diffmic test`` (training.module) sample with the same arguments
(``EvalConfig.reverse_kwargs``), so their read-outs of an image agree. The report once dropped
``eval.t_start``: its paths then started at another timestep than the predictions it explained."""

from __future__ import annotations

import pytest
import torch

from diffmic.config import load_config
from diffmic.diffusion.reverse import reverse_sample
from diffmic.inference.explain import label_trajectories
from diffmic.inference.predictor import Predictor
from diffmic.training.module import DiffMICModule

from _helpers import TINY_MODEL

SETTINGS = [
    "data.image_size=32",
    "model.num_rois=2",
    "diffusion.num_timesteps=50",
    "eval.sampler=ddim",
    "eval.steps=3",
    "eval.t_start=20",  # not the default (T-1): a caller that drops it starts elsewhere
    "eval.eta=1.0",  # stochastic steps: the per-image seeds must agree too
    "eval.num_samples=1",
    "eval.point_steps=0",
    "eval.sample_seed=5",
]


@pytest.fixture(scope="module")
def setup():
    cfg = load_config("cpu_v1", [*TINY_MODEL, *SETTINGS])
    torch.manual_seed(0)
    module = DiffMICModule(cfg.to_dict(), 3, ["a", "b", "c"]).eval()
    g = torch.Generator().manual_seed(1)
    items = [{"image": torch.randn(3, 32, 32, generator=g), "id": f"img{i}", "label": i % 3} for i in range(4)]
    return module, items


def test_the_reports_paths_end_where_the_predictor_and_test_read_out(setup):
    module, items = setup
    traj, labels = label_trajectories(module, items, list(range(len(items))))
    assert traj.shape[0] == 3 + 1 and labels == [0, 1, 2, 0]  # the start and one state per step
    explain_probs = torch.softmax(traj[-1] / module.cfg.eval.temperature, -1)

    x, ids = torch.stack([it["image"] for it in items]), [it["id"] for it in items]
    pred = Predictor(module, device="cpu").predict_tensor(x, ids)
    pred_probs = torch.tensor([[r.probs[n] for n in module.class_names] for r in pred])
    assert torch.allclose(explain_probs, pred_probs, atol=1e-5)

    test_probs = module.scores({"image": x, "id": ids}, "test")[0]
    assert torch.allclose(test_probs, pred_probs, atol=1e-5)

    # the setting matters: without t_start the chain reads out something else
    kw = {**module.cfg.eval.reverse_kwargs(), "t_start": None}
    with torch.no_grad():
        dropped = reverse_sample(module.model, module.schedule, x, **kw, ids=ids).y0[:, 0]
    assert not torch.allclose(dropped, traj[-1], atol=1e-3)
