"""Experiment grids: models × data sets × seeds from one YAML file, one table at the end.

Grid file (YAML, read with ``yaml.safe_load``)::

    out: runs/exp/breastmnist          # cells go to <out>/<data set>/<model>/seed<seed>
    reference: basic                   # paired bootstrap CIs of every model against this one
    seeds: [1, 2, 3]
    common: [train.progress_bar=false] # overrides for every cell (optional)
    datasets:
      breastmnist: {config: breastmnist, overrides: [data.image_size=32]}
    models:
      basic: [model.variant=basic, model.encoder=resnet18]
      full:  {overrides: [model.variant=full], seeds: [1, 2, 3, 4, 5]}   # per-model seeds (optional)

Overrides (in ``common``, ``datasets`` and ``models``) may hold the placeholders ``{seed}`` (the
cell's seed), ``{dataset}`` (its data set name) and ``{out}`` (the grid's ``out`` as written),
substituted per cell (:func:`substitute`), so a cell can name the same seed's cell of another model::

    models:
      basic: [model.variant=basic]
      full_from_basic: [model.variant=full, train.init_encoder_from_dcg=false,
                        "train.init_encoder_from={out}/{dataset}/basic/seed{seed}"]

k-fold cross-validation: ``folds: 5`` (beside or instead of more seeds) makes every model × seed
five cells ``<out>/<data set>/<model>/seed<seed>/fold<i>``, each an ordinary run folder trained with
``data.folds=5 data.fold=i`` (all of the data set's images pooled, stratified, lesion- / patient-grouped
where the data have groups; fold ``i`` is tested, validation is carved from the other folds). The
placeholder ``{fold}`` is the cell's fold. The summary then gives the mean ± SD over the folds (and
seeds), and the pooled out-of-fold predictions of each model and seed (every image predicted once, by
the model that did not train on it), written to ``<out>/<data set>/<model>/seed<seed>/oof_predictions.csv``,
with their metrics and percentile-bootstrap 95 % CIs over images (columns ``oof_<metric>``); the paired
CIs against the reference use these pooled predictions.

Cells run seed-major (every model of the first seed in the file's order, then the next seed), and a
cell whose overrides name the run folder of another cell runs after that cell. A cell whose source
run has not finished (not run yet, or left out with ``--only``) stops the grid with an error naming
the missing folder.

Each cell is an ordinary run folder (``config.yaml``, checkpoints, ``test_metrics.json``,
``predictions.csv``) made by :func:`diffmic.training.run.fit` then :func:`~diffmic.training.run.evaluate`.
A cell whose ``test_metrics.json`` exists is skipped, a cell with a ``last.ckpt`` but no
``fit_summary.json`` is resumed, and a cell with a finished fit but no test is only tested: an
interrupted grid continues where it stopped. A ``<cell>.lock`` file beside the cell's folder (holding the worker's pid) lets two
workers share one grid without running a cell twice; the lock of a dead process is taken over.

The summary (:func:`summarise`) reads the finished cells only and writes ``summary.csv``,
``summary.md`` and ``summary.png`` into ``out``: per data set and model the mean ± SD over seeds of
accuracy, macro-F1, balanced accuracy, quadratic κ, macro AUROC and ECE (15 bins, top-label, from the
probabilities in ``predictions.csv``), the mean AURC of the confidence (and of the sample agreement
for sampling models), and the paired bootstrap 95 % CI of each metric difference (model − reference)
on the same test images, seed by seed paired (seed ``s`` of a model against seed ``s`` of the reference).
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from diffmic.config import ConfigError, load_config
from diffmic.metrics import MetricFn, scalar_metric_fns, selective_summary

__all__ = [
    "Cell",
    "Grid",
    "load_grid",
    "substitute",
    "PLACEHOLDERS",
    "run_grid",
    "read_predictions",
    "cell_metrics",
    "metric_fn",
    "aurc",
    "pooled_ci",
    "paired_bootstrap",
    "summarise",
    "METRICS",
]

#: summary metrics, in table order
METRICS: tuple[str, ...] = ("acc", "f1", "balanced_acc", "kappa", "auroc", "ece")


@dataclass
class Cell:
    dataset: str
    model: str
    seed: int
    run_dir: Path
    config: Optional[str]
    overrides: list[str]
    fold: Optional[int] = None  # k-fold cross-validation: the fold this cell tests

    @property
    def name(self) -> str:
        """``<data set>/<model>/seed<seed>[/fold<i>]``, as in messages."""
        return f"{self.dataset}/{self.model}/seed{self.seed}" + (f"/fold{self.fold}" if self.fold is not None else "")

    @property
    def done(self) -> bool:
        return (self.run_dir / "test_metrics.json").is_file() and (self.run_dir / "predictions.csv").is_file()


@dataclass
class Grid:
    out: Path
    reference: Optional[str]
    cells: list[Cell] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    path: Optional[Path] = None  # the grid file it was read from
    folds: Optional[int] = None  # k-fold cross-validation (``folds:`` in the grid file)


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise ConfigError(f"{where}: expected a list of key=value strings, got {value!r}")
    return [str(v) for v in value]


def _seeds(value: Any, where: str) -> list[int]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    ):
        raise ConfigError(f"{where}: expected a non-empty list of integer seeds, got {value!r}")
    seen: set[int] = set()
    for s in value:
        if s in seen:  # one run would count as two seeds (a spread of 0)
            raise ConfigError(f"{where}: seed {s} is listed twice in {value!r}; list each seed once")
        seen.add(s)
    return [int(s) for s in value]


#: a data set or model name is one plain folder name (it names ``<out>/<data set>/<model>``)
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}")
#: files the summary writes into ``out``, beside the data set folders
_SUMMARY_FILES = ("summary.csv", "summary.md", "summary.png", "cells.csv")


def _names(mapping: dict, kind: str, where: str) -> list[str]:
    """The keys of ``mapping`` as folder names, checked: each a plain name (no path, no ``..``,
    no characters that break the summary table), no two naming the same folder."""
    out: dict[str, str] = {}
    for key in mapping:
        name = str(key)
        if not _NAME.fullmatch(name):
            plain = os.path.normpath(name) if name.strip() else ""
            hint = f" (did you mean '{plain}'?)" if plain != name and _NAME.fullmatch(plain) else ""
            raise ConfigError(
                f"{where}: {kind} name {name!r} is not a plain folder name{hint}: use letters, digits, "
                "'_', '-', '+' and '.' (not first), at most 100 characters"
            )
        if kind == "data set" and name.casefold() in _SUMMARY_FILES:
            raise ConfigError(f"{where}: data set name {name!r} is the name of a summary table file in out")
        other = out.get(name.casefold())
        if other is not None:
            raise ConfigError(
                f"{where}: {kind} names {name!r} and {other!r} name the same folder (file systems may "
                "ignore case); rename one"
            )
        out[name.casefold()] = name
    return list(out.values())


class _GridLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key repeated in one mapping (YAML keeps the last one)."""


def _unique_mapping(loader: _GridLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {str(key)!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping reports it
            pass
    return loader.construct_mapping(node, deep=deep)


_GridLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


#: placeholders of grid overrides, substituted per cell
PLACEHOLDERS: tuple[str, ...] = ("seed", "dataset", "out", "fold")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def substitute(override: str, *, seed: int, dataset: str, out: str | Path, fold: Optional[int] = None) -> str:
    """``override`` with ``{seed}``, ``{dataset}``, ``{out}`` (and with k folds ``{fold}``) replaced by
    the cell's values; any other ``{name}`` is a ConfigError (a typo would otherwise name a folder that
    never exists)."""
    values = {"seed": str(seed), "dataset": str(dataset), "out": str(out)}
    if fold is not None:
        values["fold"] = str(fold)
    unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(override)} - set(values))
    if unknown:
        known = [k for k in PLACEHOLDERS if k in values]
        hint = " ({fold} needs folds: in the grid)" if "fold" in unknown else ""
        raise ConfigError(
            f"override '{override}': unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
            f"known: {', '.join('{' + k + '}' for k in known)}{hint}"
        )
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], override)


def _depends_on(cell: Cell, other: Cell) -> bool:
    """Whether an override value of ``cell`` names ``other``'s run folder or a file inside it."""
    target = os.path.normpath(other.run_dir)
    for item in cell.overrides:
        if "=" not in item or item.startswith(("run.dir=", "run.seed=")):
            continue
        value = os.path.normpath(item.split("=", 1)[1].strip().strip("'\""))
        if value == target or value.startswith(target + os.sep):
            return True
    return False


def _order_dependencies(cells: list[Cell], where: str) -> list[Cell]:
    """``cells`` in their order, except that a cell naming another cell's run folder moves after it."""
    deps = {id(c): [o for o in cells if o is not c and _depends_on(c, o)] for c in cells}
    ordered: list[Cell] = []
    placed: set[int] = set()
    pending = list(cells)
    while pending:
        ready = next((c for c in pending if all(id(o) in placed for o in deps[id(c)])), None)
        if ready is None:
            names = ", ".join(c.name for c in pending)
            raise ConfigError(f"{where}: cells name each other's run folders in a cycle: {names}")
        ordered.append(ready)
        placed.add(id(ready))
        pending.remove(ready)
    return ordered


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; every cell's config is resolved now so a typo fails before training."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file '{path}' not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_GridLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except ValueError as exc:  # an integer over Python's int-string limit
        raise ConfigError(f"{path}: a value is not a usable number ({str(exc).split(';')[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with out, seeds, datasets, models")
    known = {"out", "reference", "seeds", "folds", "common", "datasets", "models"}
    extra = sorted(set(raw) - known)
    if extra:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(map(str, extra))}; valid: {', '.join(sorted(known))}")
    for key in ("out", "datasets", "models"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key '{key}'")
    out = Path(str(raw["out"]))  # relative to the working directory, like run.dir
    seeds = _seeds(raw.get("seeds", [1234]), f"{path}: seeds")
    folds = raw.get("folds")
    if folds is not None and (not isinstance(folds, int) or isinstance(folds, bool) or not 2 <= folds <= 100):
        raise ConfigError(f"{path}: folds must be a number of cross-validation folds in [2, 100], got {folds!r}")
    common = _str_list(raw.get("common"), f"{path}: common")
    datasets, models = raw["datasets"], raw["models"]
    if not isinstance(datasets, dict) or not datasets:
        raise ConfigError(f"{path}: datasets must be a non-empty mapping name -> {{config, overrides}}")
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"{path}: models must be a non-empty mapping name -> [overrides]")
    _names(datasets, "data set", f"{path}: datasets")
    _names(models, "model", f"{path}: models")
    ref = raw.get("reference")
    if ref is not None and ref not in models:
        raise ConfigError(f"{path}: reference '{ref}' is not one of the models ({', '.join(models)})")
    grid = Grid(
        out=out,
        reference=None if ref is None else str(ref),
        models=[str(m) for m in models],
        datasets=[str(d) for d in datasets],
        path=path,
        folds=folds,
    )
    for dname, dspec in datasets.items():
        dspec = dspec or {}
        if not isinstance(dspec, dict):
            raise ConfigError(f"{path}: datasets.{dname} must be a mapping with config / overrides")
        bad = sorted(set(dspec) - {"config", "overrides"})
        if bad:
            raise ConfigError(f"{path}: datasets.{dname}: unknown key(s) {', '.join(bad)}; valid: config, overrides")
        d_over = _str_list(dspec.get("overrides"), f"{path}: datasets.{dname}.overrides")
        for mname, mspec in models.items():
            m_seeds = seeds
            if isinstance(mspec, dict):
                bad = sorted(set(mspec) - {"overrides", "seeds"})
                if bad:
                    raise ConfigError(
                        f"{path}: models.{mname}: unknown key(s) {', '.join(bad)}; valid: overrides, seeds"
                    )
                if "seeds" in mspec:
                    m_seeds = _seeds(mspec["seeds"], f"{path}: models.{mname}.seeds")
                mspec = mspec.get("overrides")
            m_over = _str_list(mspec, f"{path}: models.{mname}")
            for seed in m_seeds:
                for fold in range(folds) if folds else [None]:
                    run_dir = out / str(dname) / str(mname) / f"seed{seed}"
                    cv: list[str] = []
                    if fold is not None:
                        run_dir = run_dir / f"fold{fold}"
                        cv = [f"data.folds={folds}", f"data.fold={fold}"]
                    cell = Cell(str(dname), str(mname), seed, run_dir, dspec.get("config"), [], fold)
                    try:
                        over = [
                            substitute(o, seed=seed, dataset=str(dname), out=out, fold=fold)
                            for o in common + d_over + m_over
                        ]
                        over += [*cv, f"run.seed={seed}", f"run.dir={run_dir}"]
                        load_config(dspec.get("config"), over)
                    except ConfigError as exc:
                        raise ConfigError(f"{path}: cell {cell.name}: {exc}") from None
                    cell.overrides = over
                    grid.cells.append(cell)
    # seed-major order (all models of the first seed, then the next seed; with folds, fold by fold
    # within a seed): a grid stopped early still has paired seeds of every model
    rank = {
        (c.dataset, c.model, c.seed, c.fold): (
            grid.datasets.index(c.dataset),
            i,
            c.fold or 0,
            grid.models.index(c.model),
        )
        for c in grid.cells
        for i in [sorted({x.seed for x in grid.cells if x.model == c.model}).index(c.seed)]
    }
    grid.cells.sort(key=lambda c: rank[(c.dataset, c.model, c.seed, c.fold)])
    grid.cells = _order_dependencies(grid.cells, str(path))
    return grid


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_path(run_dir: Path) -> Path:
    """``<cell>.lock`` beside the cell's run folder (fit refuses a run folder holding other files)."""
    return run_dir.with_name(run_dir.name + ".lock")


def _acquire(run_dir: Path) -> bool:
    """Create the cell's lock file with this pid; take over the lock of a dead process."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(run_dir)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def run_cell(cell: Cell) -> str:
    """Fit and test one cell (resume / test-only when partly done). Returns what was done."""
    from diffmic.training.run import evaluate, fit

    if cell.done:
        return "skipped (finished)"
    if not _acquire(cell.run_dir):
        return "skipped (another worker holds it)"
    try:
        if cell.done:
            return "skipped (finished)"
        cfg = load_config(cell.config, cell.overrides)
        last = cell.run_dir / "checkpoints" / "last.ckpt"
        did = "tested"
        if not (cell.run_dir / "fit_summary.json").is_file():
            resume = last.is_file()
            # a cell killed before its first checkpoint holds only its own partial files: start again
            started = cell.run_dir.is_dir() and any(cell.run_dir.iterdir())
            fit(cfg, resume=resume, overwrite=started and not resume)
            did = "resumed, tested" if resume else "fitted, tested"
        evaluate(cell.run_dir, "test")
        return did
    finally:
        _lock_path(cell.run_dir).unlink(missing_ok=True)


def run_grid(grid: Grid, only: Optional[list[str]] = None, log=print) -> list[tuple[Cell, str]]:
    """Run every unfinished cell in order (``only``: model names to run). Returns ``(cell, status)``."""
    done = []
    for i, cell in enumerate(grid.cells):
        if only and cell.model not in only:
            continue
        log(
            f"[{i + 1}/{len(grid.cells)}] {cell.name}: running"
            if not cell.done
            else f"[{i + 1}/{len(grid.cells)}] {cell.name}: finished, skipped"
        )
        status = run_cell(cell)
        log(f"[{i + 1}/{len(grid.cells)}] {cell.name}: {status}")
        done.append((cell, status))
    return done


# --------------------------------------------------------------------------------------------------
# Reading results
# --------------------------------------------------------------------------------------------------


def read_predictions(path: str | Path) -> dict[str, Any]:
    """``predictions.csv`` -> ids, labels, probs ``[N, C]`` (columns ``p_*``), and the optional
    ``agreement`` / ``prior_pred`` columns, sorted by id."""
    path = Path(path)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path}: no prediction rows")
    pcols = [c for c in rows[0] if c.startswith("p_")]
    if not pcols or "label" not in rows[0] or "id" not in rows[0]:
        raise ValueError(f"{path}: needs id, label and p_<class> columns (has {', '.join(rows[0])})")
    rows.sort(key=lambda r: r["id"])
    out: dict[str, Any] = {
        "ids": [r["id"] for r in rows],
        "labels": np.array([int(r["label"]) for r in rows]),
        "probs": np.array([[float(r[c]) for c in pcols] for r in rows]),
    }
    for col in ("agreement", "prior_pred", "spread"):
        if col in rows[0] and rows[0][col] != "":
            out[col] = np.array([float(r[col]) for r in rows])
    return out


def metric_fn(metric: str, num_classes: int) -> MetricFn:
    """The function ``(probs, labels) -> float`` of a summary metric (:data:`METRICS`): the package's
    one definition of each (:func:`diffmic.metrics.scalar_metric_fns` and
    :func:`diffmic.trust.calibration.ece`, 15 bins)."""
    from diffmic.trust.calibration import ece

    fns = scalar_metric_fns(num_classes)
    fns["ece"] = ece
    if metric not in fns:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(fns)}")
    return fns[metric]


def cell_metrics(pred: dict[str, Any]) -> dict[str, float]:
    """All summary metrics of one cell from its predictions (:func:`read_predictions`), so that every
    model is scored the same way: the :data:`METRICS` (in table order), ``aurc_conf`` (the AURC of
    the top-class probability), and with the optional columns ``aurc_agreement`` and ``prior_acc``."""
    p = torch.as_tensor(pred["probs"], dtype=torch.float64)
    y = torch.as_tensor(pred["labels"])
    out = {k: metric_fn(k, p.shape[1])(p, y) for k in METRICS}
    correct = (p.argmax(1) == y).double()
    out["aurc_conf"] = aurc(p.max(1).values, correct)
    if "agreement" in pred:
        # agreement first, confidence breaks ties (agreement of K samples takes K+1 values)
        score = torch.as_tensor(pred["agreement"], dtype=torch.float64) + 1e-6 * p.max(1).values
        out["aurc_agreement"] = aurc(score, correct)
    if "prior_pred" in pred:
        out["prior_acc"] = float((torch.as_tensor(pred["prior_pred"]).long() == y).double().mean())
    return out


#: the experiment table's columns from test_metrics.json's ``lesions`` block (runs with lesion masks):
#: mean share of a DCG region on the lesion, saliency peak on the lesion, pointing game
LESION_COLUMNS: dict[str, str] = {
    "roi_on_lesion": "roi_overlap",
    "peak_on_lesion": "peak_hit",
    "pointing": "pointing_hit",
}


def cell_lesions(run_dir: Path) -> dict[str, float]:
    """The :data:`LESION_COLUMNS` of a finished cell (empty without a ``lesions`` block)."""
    import json

    f = Path(run_dir) / "test_metrics.json"
    block = json.loads(f.read_text()).get("lesions") if f.is_file() else None
    if not isinstance(block, dict):
        return {}
    return {col: float(block[key]) for col, key in LESION_COLUMNS.items() if isinstance(block.get(key), (int, float))}


def aurc(score: torch.Tensor, correct: torch.Tensor) -> float:
    """The area under the risk-coverage curve of ranking the images by ``score`` (highest kept first;
    :func:`diffmic.metrics.selective_summary`)."""
    return float(selective_summary(score, correct)["aurc"])


def paired_bootstrap(
    labels: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    metric: str = "acc",
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Paired bootstrap of ``metric(a) − metric(b)`` on the same test images.

    The images are resampled with replacement ``n_boot`` times (one index set for both models);
    returns ``(observed difference, lower, upper)`` of the percentile ``1 − alpha`` interval.
    """
    labels = np.asarray(labels)
    if probs_a.shape != probs_b.shape or probs_a.shape[0] != labels.shape[0]:
        raise ValueError("paired bootstrap needs predictions of both models on the same images")
    from diffmic.trust.bootstrap import percentile_interval, resamples

    fn = metric_fn(metric, probs_a.shape[1])
    pa, pb = torch.as_tensor(probs_a, dtype=torch.float64), torch.as_tensor(probs_b, dtype=torch.float64)
    y = torch.as_tensor(labels)
    observed = fn(pa, y) - fn(pb, y)
    diffs = (fn(pa[i], y[i]) - fn(pb[i], y[i]) for i in resamples(labels.shape[0], n_boot, seed, rng="numpy"))
    lo, hi = percentile_interval(diffs, alpha)
    return float(observed), lo, hi


def _fmt(values: list[float]) -> str:
    if not values:
        return "—"
    m = float(np.mean(values))
    if len(values) == 1:
        return f"{m:.3f}"
    return f"{m:.3f} ± {float(np.std(values, ddof=1)):.3f}"


def summarise(grid: Grid, n_boot: int = 1000, ci_metrics: tuple[str, ...] = ("acc", "f1")) -> dict[str, Path]:
    """Write ``summary.csv``, ``summary.md``, ``summary.png`` (and ``cells.csv``) into ``grid.out``.

    Only finished cells count (``n`` column). Bootstrap CIs pool the paired differences over the
    seeds both models finished: for each shared seed the test images are resampled and the
    per-seed difference is averaged over seeds (the same index set for every seed and both models).
    """
    from diffmic.reporting import write_rows_csv

    grid.out.mkdir(parents=True, exist_ok=True)
    preds: dict[tuple[str, str, int], dict] = {}
    by_fold: dict[tuple[str, str, int], dict[int, Cell]] = {}
    cell_rows: list[dict[str, Any]] = []
    for c in grid.cells:
        if not c.done:
            continue
        pred = read_predictions(c.run_dir / "predictions.csv")
        if c.fold is None:
            preds[(c.dataset, c.model, c.seed)] = pred
        else:
            by_fold.setdefault((c.dataset, c.model, c.seed), {})[c.fold] = c
        cell_rows.append(
            {
                "dataset": c.dataset,
                "model": c.model,
                "seed": c.seed,
                **({"fold": c.fold} if grid.folds else {}),
                "n_test": len(pred["ids"]),
                **{k: round(v, 5) for k, v in cell_metrics(pred).items()},
                **{k: round(v, 5) for k, v in cell_lesions(c.run_dir).items()},
                "run_dir": str(c.run_dir),
            }
        )
    # the lesion columns only where some cell has lesion masks (HAM10000)
    extra = ("aurc_conf", "aurc_agreement", "prior_acc", *(k for k in LESION_COLUMNS if any(k in r for r in cell_rows)))
    for r in cell_rows:  # one header for all cells: metrics a model does not have are empty
        for k in extra:
            r.setdefault(k, None)
        r["run_dir"] = r.pop("run_dir")
    oof: dict[tuple[str, str, int], dict[str, Any]] = {}
    if grid.folds:  # every fold of a model and seed finished: its pooled out-of-fold predictions
        for key, cells in by_fold.items():
            if len(cells) == grid.folds:
                ordered = [cells[i] for i in range(grid.folds)]
                preds[key] = pool_out_of_fold(ordered)
                write_oof_predictions(ordered[0].run_dir.parent / OOF_FILE, preds[key])
                oof[key] = cell_metrics(preds[key])
    rows = []
    for d in grid.datasets:
        for m in grid.models:
            mine = [r for r in cell_rows if r["dataset"] == d and r["model"] == m]
            row: dict[str, Any] = {"dataset": d, "model": m, "n": len(mine)}
            for k in METRICS + extra:
                vals = [r[k] for r in mine if r.get(k) is not None and not math.isnan(r[k])]
                row[k] = _fmt(vals)
            if grid.folds:
                seeds = sorted(s for (dd, mm, s) in oof if dd == d and mm == m)
                pooled = [preds[(d, m, s)] for s in seeds]
                row["oof_seeds"] = len(seeds)
                row["oof_n"] = len(pooled[0]["ids"]) if pooled else 0
                for k in METRICS:
                    row[f"oof_{k}"] = _oof_ci(pooled, k, n_boot) if pooled else "—"
            ref = grid.reference
            for k in ci_metrics:
                row[f"d_{k}_vs_{ref}"] = "—"
            if ref and m != ref:
                seeds = sorted(
                    {s for (dd, mm, s) in preds if dd == d and mm == m}
                    & {s for (dd, mm, s) in preds if dd == d and mm == ref}
                )
                if seeds:
                    for k in ci_metrics:
                        row[f"d_{k}_vs_{ref}"] = pooled_ci(
                            [preds[(d, m, s)] for s in seeds], [preds[(d, ref, s)] for s in seeds], k, n_boot
                        )
            rows.append(row)
    paths = {
        "cells": write_rows_csv(grid.out / "cells.csv", cell_rows),
        "csv": write_rows_csv(grid.out / "summary.csv", rows),
    }
    md = _markdown(rows)
    (grid.out / "summary.md").write_text(md)
    paths["md"] = grid.out / "summary.md"
    paths["png"] = _figure(cell_rows, grid, grid.out / "summary.png")
    paths["record"] = _write_record(grid, cell_rows, rows, grid.out / "record.json", oof)
    return paths


#: the pooled out-of-fold predictions of a model and seed, in ``<out>/<data set>/<model>/seed<seed>/``
OOF_FILE = "oof_predictions.csv"
_OOF_HEADER = "id,fold,label,"


def pool_out_of_fold(cells: list[Cell]) -> dict[str, Any]:
    """The test predictions of the k fold cells of one model and seed, pooled: every image once,
    predicted by the model of the fold that held it out (``ids``, ``labels``, ``probs`` and
    ``fold``, sorted by id, as :func:`read_predictions`). Refused (ConfigError naming the cells) when
    the folds' test images overlap, or do not cover the images their ``split.json`` records."""
    import json

    parts: list[dict[str, Any]] = []
    owner: dict[str, str] = {}
    for c in cells:
        pred = read_predictions(c.run_dir / "predictions.csv")
        for i in pred["ids"]:
            if i in owner:
                raise ConfigError(
                    f"image {i!r} is a test image of both {owner[i]} and {c.name}: the folds do not partition "
                    "the data (were they trained with other data.* overrides or data?); re-run those cells"
                )
            owner[i] = c.name
        parts.append(pred)
    split = cells[0].run_dir / "split.json"
    if split.is_file():
        recorded = json.loads(split.read_text()).get("splits", {})
        every = {i for ids in recorded.values() for i in ids}
        missing = sorted(every - set(owner))
        extra = sorted(set(owner) - every)
        if missing or extra:
            eg = (missing or extra)[0]
            raise ConfigError(
                f"the test images of the {len(cells)} folds of {cells[0].name.rsplit('/', 1)[0]} do not cover the "
                f"data recorded in {split}: {len(missing)} image(s) in no fold's test split, {len(extra)} not in "
                f"the data (e.g. {eg!r}); re-run the folds on the same data"
            )
    ncols = {p["probs"].shape[1] for p in parts}
    if len(ncols) != 1:
        raise ConfigError(f"the folds of {cells[0].name} predict different numbers of classes: {sorted(ncols)}")
    pcols = _prob_columns(cells[0].run_dir / "predictions.csv")
    for c in cells[1:]:
        if _prob_columns(c.run_dir / "predictions.csv") != pcols:
            raise ConfigError(f"{c.name} predicts the classes {pcols} in another order or under other names")
    fold = np.concatenate([np.full(len(p["ids"]), c.fold if c.fold is not None else -1) for p, c in zip(parts, cells)])
    ids = [i for p in parts for i in p["ids"]]
    order = sorted(range(len(ids)), key=lambda j: ids[j])
    out: dict[str, Any] = {
        "ids": [ids[j] for j in order],
        "labels": np.concatenate([p["labels"] for p in parts])[order],
        "probs": np.concatenate([p["probs"] for p in parts])[order],
        "fold": fold[order],
        "columns": pcols,
    }
    for col in ("agreement", "prior_pred", "spread"):
        if all(col in p for p in parts):
            out[col] = np.concatenate([p[col] for p in parts])[order]
    return out


def _prob_columns(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        header = next(csv.reader(fh), [])
    return [c for c in header if c.startswith("p_")]


def write_oof_predictions(path: Path, pooled: dict[str, Any]) -> Path:
    """``oof_predictions.csv``: ``id, fold, label, p_<class>...`` (and ``agreement`` where the cells
    have it), one row per image. An existing file is replaced only when it is one of these."""
    from diffmic.reporting import write_rows_csv

    if path.exists():
        with open(path, encoding="utf-8", errors="replace") as fh:
            ours = fh.readline().startswith(_OOF_HEADER)
        if not ours:
            raise ConfigError(f"'{path}' exists and is not an out-of-fold predictions file written by diffmic; move it")
    rows = []
    for j, i in enumerate(pooled["ids"]):
        row: dict[str, Any] = {"id": i, "fold": int(pooled["fold"][j]), "label": int(pooled["labels"][j])}
        row.update({c: float(pooled["probs"][j, k]) for k, c in enumerate(pooled["columns"])})
        for col in ("agreement", "prior_pred", "spread"):
            if col in pooled:
                row[col] = float(pooled[col][j])
        rows.append(row)
    return write_rows_csv(path, rows)


def seed_mean_ci(
    labels: np.ndarray, probs: list[np.ndarray], metric: str, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """The metric of the predictions ``probs`` (one array per seed, on the same images: their mean
    metric), and its percentile-bootstrap ``1 − alpha`` interval: the images are resampled with
    replacement ``n_boot`` times (the same indices for every seed)."""
    from diffmic.trust.bootstrap import percentile_interval, resamples

    fn = metric_fn(metric, probs[0].shape[1])
    P = [torch.as_tensor(p, dtype=torch.float64) for p in probs]
    y = torch.as_tensor(np.asarray(labels))
    observed = float(np.mean([fn(p, y) for p in P]))
    vals = (float(np.mean([fn(p[i], y[i]) for p in P])) for i in resamples(len(y), n_boot, seed, rng="numpy"))
    lo, hi = percentile_interval(vals, alpha)
    return observed, lo, hi


def _oof_ci(pooled: list[dict], metric: str, n_boot: int) -> str:
    for p in pooled[1:]:
        if p["ids"] != pooled[0]["ids"]:
            raise ConfigError("the out-of-fold predictions of two seeds cover different images")
    obs, lo, hi = seed_mean_ci(pooled[0]["labels"], [p["probs"] for p in pooled], metric, n_boot)
    return f"{obs:.3f} [{lo:.3f}, {hi:.3f}]"


def cell_provenance(run_dir: Path) -> dict[str, Any]:
    """What a finished cell's run folder says about how it was made: its resolved config, the
    SHA-256 of its recorded split, and the wall time, machine and load of its fit and test."""
    import hashlib
    import json

    out: dict[str, Any] = {}
    split = run_dir / "split.json"
    if split.is_file():
        out["split_sha256"] = hashlib.sha256(split.read_bytes()).hexdigest()
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        out["config"] = yaml.safe_load(cfg.read_text())
    for name, key, sub in (("fit_summary.json", "fit", None), ("test_metrics.json", "test", "provenance")):
        f = run_dir / name
        if not f.is_file():
            continue
        d = json.loads(f.read_text())
        d = d.get(sub, {}) if sub else d
        out[key] = {
            k: d.get(k)
            for k in ("started", "wall_time_s", "cpu_time_s", "cpu_utilisation", "load_average", "machine", "resumed")
            if k in d
        }
    return out


def _write_record(grid: Grid, cell_rows: list[dict], rows: list[dict], path: Path, oof: Optional[dict] = None) -> Path:
    """``record.json``: a small, committable record of what the grid measured (the summary table, the
    per-cell metrics, each cell's resolved config, split hash, wall times, machine and load), so that
    a number quoted from this grid can cite it. No images, checkpoints or predictions."""
    from diffmic.provenance import machine
    from diffmic.reporting import write_json

    cells = []
    for r in cell_rows:
        run = Path(r["run_dir"])
        cells.append({**{k: v for k, v in r.items() if k != "run_dir"}, **cell_provenance(run)})
    record: dict[str, Any] = {
        "grid": str(grid.path) if grid.path else None,
        "out": str(grid.out),
        "summarised_on": machine(),
        "summary": rows,
        "cells": cells,
    }
    if grid.folds:  # the pooled out-of-fold metrics of each model and seed
        record["folds"] = grid.folds
        record["out_of_fold"] = [
            {"dataset": d, "model": m, "seed": s, **{k: round(v, 5) for k, v in metrics.items()}}
            for (d, m, s), metrics in (oof or {}).items()
        ]
    return write_json(path, record)


def pooled_ci(a: list[dict], b: list[dict], metric: str, n_boot: int, seed: int = 0) -> str:
    """Mean over seeds of the paired difference ``metric(a) − metric(b)``, with a bootstrap over images.

    Within a seed both models must have been tested on the same images. Each seed is scored against its
    own labels: seeds may have different test images (a seeded random split per seed, e.g. a class
    folder). When every seed has the same images, one index set resamples them all; otherwise each seed
    draws its own index sets (seeded ``seed + k``) and the k-th resample of every seed is averaged.
    """
    for pa, pb in zip(a, b):
        if pa["ids"] != pb["ids"]:
            raise ValueError("the model and its reference were tested on different images")
    from diffmic.trust.bootstrap import percentile_interval, resamples

    fn = metric_fn(metric, a[0]["probs"].shape[1])
    A = [torch.as_tensor(p["probs"], dtype=torch.float64) for p in a]
    B = [torch.as_tensor(p["probs"], dtype=torch.float64) for p in b]
    Y = [torch.as_tensor(np.asarray(p["labels"])) for p in a]
    obs = float(np.mean([fn(pa, y) - fn(pb, y) for pa, pb, y in zip(A, B, Y)]))
    draws: Iterable[Sequence[torch.Tensor]]
    if all(p["ids"] == a[0]["ids"] for p in a):
        draws = ([i] * len(a) for i in resamples(len(Y[0]), n_boot, seed, rng="numpy"))
    else:
        draws = zip(*(resamples(len(y), n_boot, seed + k, rng="numpy") for k, y in enumerate(Y)))
    diffs = (float(np.mean([fn(pa[i], y[i]) - fn(pb[i], y[i]) for pa, pb, y, i in zip(A, B, Y, idx)])) for idx in draws)
    lo, hi = percentile_interval(diffs, 0.05)
    return f"{obs:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no finished cells)\n"

    def cell(v: Any) -> str:  # a `|` or a line break would end the cell or the row
        return " ".join(str(v).split()).replace("|", "\\|")

    cols = list(rows[0].keys())
    lines = ["| " + " | ".join(cell(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _figure(cell_rows: list[dict], grid: Grid, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = grid.datasets
    fig, axes = plt.subplots(1, 2 * len(ds), figsize=(4.5 * 2 * len(ds), 3.6), squeeze=False)
    for j, d in enumerate(ds):
        for i, k in enumerate(("acc", "f1")):
            ax = axes[0, 2 * j + i]
            for x, m in enumerate(grid.models):
                vals = [r[k] for r in cell_rows if r["dataset"] == d and r["model"] == m]
                if vals:
                    ax.scatter([x] * len(vals), vals, s=14, alpha=0.6)
                    ax.errorbar(
                        [x],
                        [np.mean(vals)],
                        yerr=[np.std(vals, ddof=1) if len(vals) > 1 else 0],
                        fmt="_",
                        color="k",
                        capsize=4,
                        markersize=14,
                    )
            ax.set_xticks(range(len(grid.models)), grid.models, rotation=45, ha="right")
            ax.set_title(f"{d}: test {'accuracy' if k == 'acc' else 'macro-F1'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
