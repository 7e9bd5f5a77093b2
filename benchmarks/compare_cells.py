"""Paired comparisons between the models of finished experiment grids (docs/results.md, "Evidence").

    python benchmarks/compare_cells.py benchmarks/grids/ham_core.yaml \
        --pair full:dcg --pair full:basic --pair full:ens(basic+dcg) --pair full:prior(full)

``A:B`` pairs are compared on the same test images, seed ``s`` of A with seed ``s`` of B, over the
seeds both finished; the difference is averaged over seeds and its 95 % interval comes from a
bootstrap over test images (one index set for every seed and both models; ``experiment.pooled_ci``).
Besides the grid's model names, a side may be

- ``ens(m1+m2)``: the average of the two models' test probabilities (a post-hoc ensemble, the control
  for "the diffusion fuses two networks");
- ``prior(m)``: the argmax of model m's own fused DCG prior (``prior_pred`` in predictions.csv;
  accuracy and macro-F1 only: its probabilities are not stored, so no AURC).

Also printed per model: the AURC of the error ranking by softmax confidence and by sample agreement,
and their paired difference over seeds. Output: Markdown on stdout; ``--json`` for one JSON line.
Nothing here is used to choose anything: it reads test predictions of finished runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffmic.experiment import cell_metrics, load_grid, pooled_ci, read_predictions


def _load(grids: list[str], extra: Sequence[str] = ()) -> dict[tuple[str, int], dict]:
    preds: dict[tuple[str, int], dict] = {}
    for spec in extra:  # NAME=FOLDER holding seed<N>/predictions.csv (e.g. from retest_deterministic.sh)
        name, _, folder = spec.partition("=")
        cells = sorted(Path(folder).glob("seed*/predictions.csv"))
        if not name or not cells:
            raise SystemExit(f"--runs {spec}: expected NAME=FOLDER with FOLDER/seed<N>/predictions.csv")
        for f in cells:
            preds[(name, int(f.parent.name[4:]))] = read_predictions(f)
    for g in grids:
        grid = load_grid(g)
        for c in grid.cells:
            if c.done:
                preds[(c.model, c.seed)] = read_predictions(c.run_dir / "predictions.csv")
    return preds


def _side(name: str, seed: int, preds: dict) -> dict | None:
    m = re.fullmatch(r"ens\((\w+)\+(\w+)\)", name)
    if m:
        a, b = preds.get((m.group(1), seed)), preds.get((m.group(2), seed))
        if a is None or b is None:
            return None
        if a["ids"] != b["ids"]:
            raise SystemExit(f"{name}: the two models were tested on different images")
        return {"ids": a["ids"], "labels": a["labels"], "probs": (a["probs"] + b["probs"]) / 2}
    m = re.fullmatch(r"prior\((\w+)\)", name)
    if m:
        a = preds.get((m.group(1), seed))
        if a is None:
            return None
        if "prior_pred" not in a:
            raise SystemExit(f"{name}: {m.group(1)} has no prior_pred column")
        onehot = np.eye(a["probs"].shape[1])[a["prior_pred"].astype(int)]
        return {"ids": a["ids"], "labels": a["labels"], "probs": onehot, "argmax_only": True}
    return preds.get((name, seed))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grids", nargs="*", help="grid YAML files (their finished cells are pooled by model name)")
    ap.add_argument(
        "--runs", action="append", default=[], help="NAME=FOLDER: extra cells FOLDER/seed<N> under model name NAME"
    )
    ap.add_argument("--pair", action="append", default=[], help="A:B, e.g. full:dcg or full:ens(basic+dcg)")
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    preds = _load(args.grids, args.runs)
    models = sorted({m for m, _ in preds})
    seeds = sorted({s for _, s in preds})
    out: dict = {"models": {}, "pairs": {}}
    print("| model | seeds | acc | macro-F1 | AURC (confidence) | AURC (agreement) |")
    print("|---|---|---|---|---|---|")
    names = models + sorted({s for p in args.pair for s in p.split(":") if s not in models})
    for name in names:
        ps = [p for s in seeds if (p := _side(name, s, preds)) is not None]
        if not ps:
            continue
        mets = [cell_metrics(p) for p in ps]
        ranked = [m for p, m in zip(ps, mets) if not p.get("argmax_only")]  # prior(m): no probabilities to rank
        conf = [m["aurc_conf"] for m in ranked]
        agr = [m["aurc_agreement"] for m in ranked if "aurc_agreement" in m]
        row = {
            "n": len(ps),
            "acc": float(np.mean([m["acc"] for m in mets])),
            "f1": float(np.mean([m["f1"] for m in mets])),
            "aurc_conf": float(np.mean(conf)) if conf else None,
            "aurc_agreement": float(np.mean(agr)) if agr else None,
        }
        out["models"][name] = row
        agr_s = f"{row['aurc_agreement']:.4f}" if agr else "—"
        conf_s = f"{row['aurc_conf']:.4f}" if conf else "—"
        print(f"| {name} | {len(ps)} | {row['acc']:.3f} | {row['f1']:.3f} | {conf_s} | {agr_s} |")
    print()
    print("| A − B | seeds | Δ acc [95 % CI] | Δ macro-F1 [95 % CI] |")
    print("|---|---|---|---|")
    for pair in args.pair:
        a, b = pair.split(":")
        both = [
            (pa, pb) for s in seeds if (pa := _side(a, s, preds)) is not None and (pb := _side(b, s, preds)) is not None
        ]
        if not both:
            print(f"| {a} − {b} | 0 | — | — |")
            continue
        A, B = [x for x, _ in both], [y for _, y in both]
        acc = pooled_ci(A, B, "acc", args.boot)
        f1 = pooled_ci(A, B, "f1", args.boot)  # from the argmax: valid for prior(m) too
        out["pairs"][pair] = {"n": len(both), "acc": acc, "f1": f1}
        print(f"| {a} − {b} | {len(both)} | {acc} | {f1} |")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
