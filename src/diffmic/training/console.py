"""What the commands print: useful lines by default, Lightning's chatter only with ``--verbose``.

By default ``diffmic`` keeps the progress bars, the final metrics and where files went, and hides

* Lightning's INFO lines (``GPU available: ...``, ``TPU available: ...``, the "💡 Tip: try installing
  litlogger / litmodels" advertisements, ``Trainer.fit stopped: max_epochs reached``, the DDP
  ``Initializing distributed ...`` banners),
* the model-summary table (``Trainer(enable_model_summary=...)``, see :func:`model_summary`),
* a few known warnings that say nothing actionable in a diffmic run (each filter below names its
  message; every other warning is still shown).

``quiet(False)`` (``diffmic -v``/``--verbose``) restores Lightning's defaults. Library users who
never call :func:`quiet` get Lightning's default output.
"""

from __future__ import annotations

import logging
import warnings
from typing import cast

_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")

# (message regex, category, why it is hidden)
KNOWN_NOISE: tuple[tuple[str, type[Warning], str], ...] = (
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        "raised by torch inside Lightning's own _pytree helper; nothing a user can change",
    ),
    (
        r"Experiment logs directory .* exists and is not empty",
        UserWarning,
        (
            "the TensorBoard logger writes into logs/ before the CSV logger looks at it; on --resume "
            "fit() keeps the old metrics.csv as metrics.partN.csv first"
        ),
    ),
    (
        r"Checkpoint directory .* exists and is not empty",
        UserWarning,
        "fit() creates checkpoints/ itself and refuses to reuse a run folder without --resume",
    ),
    (
        r"The number of training batches \(\d+\) is smaller than the logging interval",
        UserWarning,
        "small data sets: epoch-level metrics are logged anyway",
    ),
    (
        r"Found \d+ module\(s\) in eval mode at the start of training",
        UserWarning,
        "model.freeze_stride keeps the frozen backbone layers in eval mode on purpose (fixed BatchNorm statistics)",
    ),
    (
        r"It is recommended to use `self.log\('(val|test)/\w+', \.\.\., sync_dist=True\)`",
        UserWarning,
        (
            "DDP: the val/test metrics are torchmetrics states synchronised over all ranks before they are "
            "logged, so every rank logs the same global value"
        ),
    ),
)

_state = {"verbose": True}


def quiet(enabled: bool = True) -> None:
    """Hide (``enabled=True``) or show again Lightning's INFO lines, the model summary and the known
    warnings of :data:`KNOWN_NOISE`. Call it once, before building a Trainer."""
    import lightning.fabric
    import lightning.pytorch  # noqa: F401

    _state["verbose"] = not enabled
    level = logging.WARNING if enabled else logging.INFO
    for name in _LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for message, category, _why in KNOWN_NOISE:
        if enabled:
            warnings.filterwarnings("ignore", message=message, category=category)
        else:
            # typeshed declares the filter list a Sequence (editing it is discouraged, not refused);
            # removing exactly the filters added above is the one way to undo them
            cast(list, warnings.filters)[:] = [
                f
                for f in warnings.filters
                if not (f[0] == "ignore" and f[1] is not None and f[1].pattern == message and f[2] is category)
            ]


def verbose() -> bool:
    """Whether Lightning's full output (model summary, INFO lines) is wanted."""
    return _state["verbose"]


def model_summary(for_fit: bool) -> bool:
    """``Trainer(enable_model_summary=...)``: the table only for a verbose fit."""
    return for_fit and _state["verbose"]
