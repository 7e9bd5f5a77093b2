"""One Markdown table from several ``prior_tracking.py`` JSON outputs (validation split only).

    python benchmarks/tracking_table.py runs/logs/pt_*.json

Per run: the DCG prior's accuracy / macro-F1, the released read-out (K = 8) and the deterministic
point read-out, how often K = 8 changes the prior's arg-max, and the denoiser's noise error at the
smallest timesteps with the true inputs, with ρ(x) shuffled between images and with the prior
shuffled (how much each input is used).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(d: dict, name: str) -> str:
    def get(*keys, fmt="{:.3f}"):
        v = d
        for k in keys:
            if not isinstance(v, dict) or k not in v:
                return "—"
            v = v[k]
        return fmt.format(v) if isinstance(v, (int, float)) else "—"

    def pts(a: tuple, b: tuple) -> str:  # difference in points
        try:
            va, vb = d[a[0]][a[1]], d[b[0]][b[1]]
        except (KeyError, TypeError):
            return "—"
        return f"{100 * (va - vb):+.1f}"

    eps = d.get("eps_mse_by_t_bucket", {})
    e0 = lambda k: f"{eps[k][0]:.3f}" if k in eps and eps[k] else "—"  # noqa: E731
    return (
        f"| {name} | {get('prior', 'acc')} / {get('prior', 'f1')} "
        f"| {get('readout_K8', 'acc')} / {get('readout_K8', 'f1')} "
        f"| {get('readout_point', 'acc')} / {get('readout_point', 'f1')} "
        f"| {pts(('readout_K8', 'acc'), ('prior', 'acc'))} | {pts(('readout_point', 'acc'), ('prior', 'acc'))} "
        f"| {get('readout_K8', 'argmax_differs_from_prior')} "
        f"| {e0('true')} | {e0('shuffled_image')} | {e0('shuffled_prior')} |"
    )


def main(paths: list[str]) -> None:
    print(
        "| cell | prior acc / F1 | K = 8 read-out acc / F1 | point read-out acc / F1 "
        "| K = 8 − prior (acc pts) | point − prior (acc pts) | K = 8 changes prior arg-max "
        "| ε-MSE, first t bucket | ρ(x) shuffled | prior shuffled |"
    )
    print("|" + "---|" * 10)
    for p in paths:
        try:
            d = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"| {p} | unreadable: {exc} |" + " |" * 8)
            continue
        name = Path(d.get("run", p)).parent.name if d.get("run") else Path(p).stem
        if d.get("epoch") is not None:  # which checkpoint was diagnosed
            name += f" ({Path(d.get('checkpoint', '')).stem or 'ckpt'}, epoch {d['epoch']})"
        print(row(d, name))


if __name__ == "__main__":
    main(sys.argv[1:])
