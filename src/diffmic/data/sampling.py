"""Training-set sampling: epoch-seeded order and per-sample augmentation seeds, class balance.

The order of an epoch is a function of (seed, epoch) only, so a resumed run repeats an
uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["EpochSeededSampler", "class_balance_weights", "drops_last_batch", "train_batches_per_epoch"]


class EpochSeededSampler(torch.utils.data.Sampler[int]):
    """Shuffles with a permutation that depends only on (seed, epoch).

    Lightning calls ``set_epoch`` at the start of every epoch, so a run resumed from a checkpoint
    sees exactly the batch order of an uninterrupted run (a generator created once would restart
    its sequence after a resume). Under DDP Lightning wraps it in a distributed sampler.

    ``weights`` (one per sample) switches to drawing ``num_samples`` indices *with replacement*
    with these probabilities (class-balanced sampling, see :func:`class_balance_weights`), still
    a function of (seed, epoch) only.
    """

    def __init__(self, num_samples: int, seed: int, weights: Sequence[float] | np.ndarray | None = None) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0
        self.weights = None
        if weights is not None:
            w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
            if (
                w.shape != (self.num_samples,)
                or not bool(torch.isfinite(w).all())
                or bool((w < 0).any())
                or float(w.sum()) <= 0
            ):
                raise ValueError(f"weights must be {self.num_samples} finite non-negative numbers with a positive sum")
            self.weights = w

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        base = self.seed * 100_003 + self.epoch
        g = torch.Generator().manual_seed(base)
        if self.weights is None:
            order = torch.randperm(self.num_samples, generator=g).tolist()
            # (index, per-sample augmentation seed) pairs, see CachedImageDataset.__getitem__
            return iter((i, (base * 1_000_033 + i) % (2**63 - 1)) for i in order)
        order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g).tolist()
        # an index may repeat: seed the augmentation by position so repeats differ
        return iter((i, (base * 1_000_033 + k) % (2**63 - 1)) for k, i in enumerate(order))


def class_balance_weights(labels: Sequence[int] | np.ndarray, power: float) -> np.ndarray:
    """Per-sample sampling weights ``n_c ** -power`` for a sample of class ``c``.

    ``power`` 0 gives uniform sampling (the data's own class frequencies), 1 gives every class the
    same expected share per epoch, 0.5 (square-root balancing) makes class ``c``'s share
    proportional to ``sqrt(n_c)``. Not in the paper or the released code.
    """
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"class-balance power must be in [0, 1], got {power}")
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    return counts[labels].astype(np.float64) ** -float(power)


def drops_last_batch(num_train: int, batch_size: int) -> bool:
    """Whether the training loader drops its last batch: only when it would hold a single image, which
    BatchNorm cannot normalise in training mode ("Expected more than 1 value per channel")."""
    return batch_size > 1 and num_train > batch_size and num_train % batch_size == 1


def train_batches_per_epoch(num_train: int, batch_size: int) -> int:
    """Optimisation steps in one training epoch (the last partial batch is kept unless it would hold one
    image, see :func:`drops_last_batch`)."""
    if num_train < 1 or batch_size < 1:
        raise ValueError(f"{num_train} training images at batch size {batch_size}")
    return num_train // batch_size if drops_last_batch(num_train, batch_size) else -(-num_train // batch_size)
