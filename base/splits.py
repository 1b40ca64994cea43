"""Held-out splits other than the validation split: K-fold cross-validation (``data_loader.args.fold``), the
stratified test split of the image-folder and table parts, and training and validating on the same samples
(``trainer.overfit_batches``). Imported only when a config asks for one: a default run never does.
"""

import torch

from utils.errors import UserError


def check_fraction(value, name):
    """``data_loader.args.NAME`` as a fraction in [0, 1), or one line saying what it should be."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise UserError(f"data_loader.args.{name}: got {value!r}, expected a fraction in [0, 1)")
    return float(value)


def stratified_split(labels, fraction, seed=0):
    """Indices ``(kept, held_out)``: ``round(fraction * count)`` of each label held out (at least one kept),
    chosen by a permutation seeded with ``seed``; both sorted. The image-folder and table parts hold their test
    split out with it, with a fixed seed, so that the same samples are held out on every run."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).view(-1)
        members = members[torch.randperm(len(members), generator=generator)]
        count = min(round(fraction * len(members)), len(members) - 1)
        held.append(members[:count])
        kept.append(members[count:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def fold_split(indices, fold):
    """K-fold cross-validation: ``(train, valid)`` of ``indices`` for ``fold = [k, K]``, validating on fold k of K.

    The folds come from one permutation seeded with 0, not with the run's seed: the same folds
    for every configuration and every seed of a sweep, so their scores compare.
    """
    ok = (isinstance(fold, (list, tuple)) and len(fold) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in fold) and fold[1] >= 2 and 0 <= fold[0] < fold[1])
    if not ok:
        raise UserError(f"data_loader.args.fold: got {fold!r}, expected [k, K] with K >= 2 and 0 <= k < K"
                        " (validate on fold k of K)")
    k, count = fold
    if len(indices) < count:
        raise UserError(f"data_loader.args.fold: {count} folds of {len(indices)} samples leave a fold empty")
    perm = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(0))]
    bounds = [round(i * len(indices) / count) for i in range(count + 1)]
    return torch.cat([perm[: bounds[k]], perm[bounds[k + 1]:]]), perm[bounds[k]:bounds[k + 1]]


def fix_to(loader, indices):
    """Train ``loader`` (a BaseDataLoader) on the samples ``indices`` alone, in that order, without random
    augmentation; returns a loader that validates on the same samples (what overfitting a few batches needs)."""
    loader.valid_idx = torch.as_tensor(indices, dtype=torch.int64)
    loader.sampler = type(loader.sampler)(loader.valid_idx, shuffle=False, seed=loader.seed)
    loader.shuffle, loader._pipeline, loader._loader = False, loader._pipelines["eval"], None
    return loader.split_validation()
