"""Compare the uncertainty of tested runs on the same test images (docs/uncertainty.md).

    python benchmarks/trust_compare.py runs/demo runs/demo_basic

Per run: accuracy, ECE (scaled / unscaled), AURC of several confidence scores, conformal coverage
and set size at the run's level, and the mean APS set size at an equal empirical test coverage
(0.90, the threshold chosen on the test split itself: a post-hoc comparison of the rankings, not a
deployable rule).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch

from diffmic.metrics import selective_summary
from diffmic.trust.calibration import apply_temperature
from diffmic.trust.conformal import aps_scores, image_uniforms


def load(run: Path):
    m = json.loads((run / "test_metrics.json").read_text())
    with open(run / "predictions.csv", newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: r["id"])
    return m, rows


def set_size_at_coverage(probs, labels, u, coverage=0.9) -> float:
    s = aps_scores(probs, u)
    true = s.gather(1, labels[:, None]).flatten()
    q = torch.quantile(true, coverage, interpolation="higher")
    sets = s <= q
    sets[torch.arange(len(labels)), probs.argmax(-1)] = True
    return float(sets.sum(-1).double().mean())


def main(runs: list[str]) -> None:
    ids0 = None
    for run in map(Path, runs):
        m, rows = load(run)
        ids = [r["id"] for r in rows]
        if ids0 is not None and ids != ids0:
            raise SystemExit(f"{run}: not the same test images as {runs[0]}")
        ids0 = ids
        names = m["class_names"]
        probs = torch.tensor([[float(r[f"p_{n}"]) for n in names] for r in rows], dtype=torch.float64)
        labels = torch.tensor([int(r["label"]) for r in rows])
        correct = probs.argmax(-1) == labels
        out = {
            "run": str(run),
            "variant": m.get("variant"),
            "acc": m["acc"],
            "ece": m["calibration"]["ece"],
            "ece_unscaled": m["calibration"]["ece_unscaled"],
            "nll": m["calibration"]["nll"],
            "temperature": m["calibration"]["temperature"],
            "aurc_confidence": selective_summary(probs.max(-1).values, correct)["aurc"],
        }
        if "agreement" in rows[0] and rows[0]["agreement"] != "":
            agree = torch.tensor([float(r["agreement"]) for r in rows], dtype=torch.float64)
            out["aurc_agreement_then_confidence"] = selective_summary(agree + 1e-3 * probs.max(-1).values, correct)[
                "aurc"
            ]
        if "ttest_p" in rows[0]:
            p = torch.tensor([float(r["ttest_p"]) for r in rows], dtype=torch.float64)
            out["aurc_ttest_p"] = selective_summary(-p, correct)["aurc"]
            out["pavpu"] = m["uncertainty"]["pavpu"]
        # the conformal sets use the temperature-scaled probabilities (docs/uncertainty.md), also
        # when the calibration adds an isotonic map to the reported confidence
        set_probs = probs
        if m["calibration"].get("calibrator") == "temperature+isotonic":
            raw = torch.tensor([[float(r[f"unscaled_p_{n}"]) for n in names] for r in rows], dtype=torch.float64)
            set_probs = apply_temperature(raw, m["calibration"]["temperature"])
        out["calibrator"] = m["calibration"].get("calibrator", "temperature")
        c = m["conformal"]
        out.update(
            conformal_level=c["level"],
            conformal_coverage=c["coverage"],
            conformal_set_size=c["mean_set_size"],
            set_size_at_test_coverage_0_90=set_size_at_coverage(set_probs, labels, image_uniforms(ids)),
        )
        r = m["referral"]
        out.update(referred_fraction=r["referred_fraction"], accuracy_kept=r["accuracy_kept"])
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
