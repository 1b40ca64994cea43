"""``CsvDataLoader``: a table read from a CSV file, one row a sample, a ``target`` column and numeric feature columns.

A part (utils/parts.py): delete this file, configs/csv.json and tests/parts/test_tables.py,
and the other loaders train as before. In a config::

    "data_loader": {"type": "CsvDataLoader",
                    "args": {"path": "data/example_table.csv", "target": "species", "task": "classification"}}

Promises:

* The first row names the columns. ``features`` defaults to every column other than the
  target whose values are all numbers (missing values aside); named features must be numeric.
  A column of mostly numbers with a few other cells (text, ``inf``, a NUL) is not a text
  column to leave out: the first such cell is one line naming its line and column. So is a
  row repeating the first row (two files joined).
* Features and regression targets must stay finite: statistics that overflow (values near
  1e308) or values beyond float32's range after scaling are one line naming the column.
* A missing value (empty, ``NA``, ``N/A``, ``NaN``, ``null``, ``None``, ``?``) in the target or
  a feature, a non-numeric feature value, an unknown column, a row of the wrong length:
  one line of :class:`~utils.errors.UserError` naming the file, the line and the column.
* ``task="classification"``: the target's distinct values are the class names, sorted
  (numerically when they are all numbers), or ``class_names`` when given; targets are int64
  labels. ``task="regression"``: targets are float32 numbers.
* A ``test_split`` fraction of the rows (per class for classification) is held out by a
  permutation with a fixed seed (:data:`SPLIT_SEED`): the same rows every time, whatever the
  run's seed. Standardisation is fitted on the training rows only.
* Regression (``standardize``, the default): the target is standardised too, with the training
  rows' mean and std, kept in ``feature_stats["target"]`` (so in the run's config, like the
  features' scaling). The model learns the standardised number and the loss is computed on it;
  the metrics report the target's own units: each torchmetrics metric gets the scaling as
  ``args.target_stats`` (parts/torchmetrics.py maps outputs and targets back before its update),
  and ``predict.py`` maps its predictions back. configs/csv_regression.json is such a run.
* A regression task refuses classification metrics (``accuracy``, ``top_k_acc``,
  ``torchmetrics.classification.*``) and losses, and the built-in ``mae`` on a standardised
  target (it would score standardised units): one line each, before anything is written.
* Read with the ``csv`` module; no pandas.
"""

from __future__ import annotations

import csv
import math
import os

import torch
from torch.utils.data import Dataset

from base.base_data_loader import BaseDataLoader
from base.splits import check_fraction, stratified_split
from utils.config import did_you_mean
from utils.errors import UserError

MISSING = {"", "na", "n/a", "nan", "null", "none", "?"}
TASKS = ("classification", "regression")
SPLIT_SEED = 0


def parse_number(text):
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _a_number(text):
    return "a finite number" if _parses(text) else "a number"


def _parses(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def _columns_hint(columns):
    return ", ".join(columns)


class Table:
    """A parsed CSV file.

    Attributes:
        feature_names: the feature columns, in file order (or in the order ``features`` gives).
        inputs: float64 ``(N, F)``.
        targets: int64 labels (classification) or float32 values (regression), ``(N,)``.
        class_names: list of str (classification), else None.
    """

    def __init__(self, path, target, features=None, task="classification", class_names=None, delimiter=","):
        if task not in TASKS:
            raise UserError(f"data_loader.args.task: got {task!r}, expected one of {', '.join(TASKS)}")
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise UserError(f"data_loader.args.path: expected the path of a CSV file, got {path!r}")
        path = os.path.expanduser(os.fspath(path))
        if not os.path.isfile(path):  # missing, or a folder, a FIFO, a device (never opened: it could block)
            from utils.io_problems import not_a_file

            raise UserError(f"data_loader.args.path: {not_a_file(path, hint='give the path of a CSV file')}")
        if not isinstance(target, str) or not target:
            raise UserError(f"data_loader.args.target: expected a column name, got {target!r}")
        if not isinstance(delimiter, str) or len(delimiter) != 1:
            raise UserError(f"data_loader.args.delimiter: expected one character, got {delimiter!r}")
        self.path = path
        header, rows = self._read(path, delimiter)
        if target not in header:
            raise UserError(f"data_loader.args.target: no column {target!r} in {path}{did_you_mean(target, header)} columns: {_columns_hint(header)}")
        t = header.index(target)
        if features is None:
            names = [name for i, name in enumerate(header) if i != t and self._numeric(rows, i, name)]
            if not names:
                raise UserError(f"{path}: no numeric column besides the target {target!r}; columns: {_columns_hint(header)}")
        else:
            if not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features):
                raise UserError(f"data_loader.args.features: expected a list of column names, got {features!r}")
            for name in features:
                if name not in header:
                    raise UserError(f"data_loader.args.features: no column {name!r} in {path}{did_you_mean(name, header)} columns: {_columns_hint(header)}")
                if name == target:
                    raise UserError(f"data_loader.args.features: {name!r} is the target column; remove it from the features")
            if len(set(features)) != len(features):
                raise UserError(f"data_loader.args.features: a column is named twice in {features}")
            names = list(features)
        self.feature_names, self.lines = names, [line for line, _ in rows]
        index = [header.index(name) for name in names]
        values = [[self._value(row, i, header[i], line) for i in index] for line, row in rows]
        self.inputs = torch.tensor(values, dtype=torch.float64).view(len(rows), len(names))
        if task == "regression":
            self.class_names = None
            self.targets = torch.tensor([self._value(row, t, target, line) for line, row in rows], dtype=torch.float32)
        else:
            labels = [self._label(row, t, target, line) for line, row in rows]
            self.class_names = self._classes(labels, class_names, target)
            lookup = {name: i for i, name in enumerate(self.class_names)}
            for (line, _), label in zip(rows, labels):
                if label not in lookup:
                    raise UserError(f"{path} line {line}, column {target!r}: class {label!r} is not one of the saved"
                                    f" classes ({', '.join(self.class_names)}); the model was trained on those")
            self.targets = torch.tensor([lookup[label] for label in labels], dtype=torch.int64)

    def __len__(self):
        return len(self.targets)

    def _read(self, path, delimiter):
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f, delimiter=delimiter)
                header = next(reader, None)
                if header is None or not any(h.strip() for h in header):
                    raise UserError(f"{path} is empty: expected a first row naming the columns")
                header = [h.strip() for h in header]
                for i, name in enumerate(header):
                    if not name:
                        raise UserError(f"{path} line 1: column {i + 1} has no name")
                    if name in header[:i]:
                        raise UserError(f"{path} line 1: the column name {name!r} appears twice")
                rows = []
                for row in reader:
                    if not row or (len(row) == 1 and not row[0].strip()):
                        continue  # blank line
                    if len(row) != len(header):
                        raise UserError(f"{path} line {reader.line_num}: {len(row)} values, but the first row names {len(header)} columns")
                    if [v.strip() for v in row] == header:
                        raise UserError(f"{path} line {reader.line_num} repeats the first row (the column names), as"
                                        " where two files were joined: remove it")
                    rows.append((reader.line_num, [v.strip() for v in row]))
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise UserError(f"cannot read {path}: {' '.join(str(err).split())}") from None
        if not rows:
            raise UserError(f"{path} has a header but no rows")
        return header, rows

    def _numeric(self, rows, i, column):
        """Whether column ``i`` holds numbers (missing values aside). Mostly numbers with a few other cells is a
        mistake in those cells, not a text column: a UserError naming the first."""
        present = [(line, row[i]) for line, row in rows if row[i].lower() not in MISSING]
        bad = [(line, v) for line, v in present if parse_number(v) is None]
        if bad and sum(_parses(v) for _, v in present) > len(present) / 2:  # inf and nan count as numbers here
            line, text = bad[0]
            raise UserError(f"{self.path} line {line}, column {column!r}: {text!r} is not {_a_number(text)}, but"
                            f" {len(present) - len(bad)} of the column's {len(present)} values are; fix the"
                            f" cell{'s' if len(bad) > 1 else ''} ({len(bad)}), or name data_loader.args.features"
                            " without this column")
        return bool(present) and not bad

    def _value(self, row, i, column, line):
        text = row[i]
        if text.lower() in MISSING:
            raise UserError(f"{self.path} line {line}, column {column!r}: missing value ({text!r}); fill it in or remove the row")
        value = parse_number(text)
        if value is None:
            raise UserError(f"{self.path} line {line}, column {column!r}: {text!r} is not {_a_number(text)}; features"
                            " and regression targets must be numeric (leave the column out of data_loader.args.features, or encode it as numbers)")
        return value

    def _label(self, row, i, column, line):
        text = row[i]
        if text.lower() in MISSING:
            raise UserError(f"{self.path} line {line}, column {column!r}: missing value ({text!r}); fill it in or remove the row")
        return text

    def _classes(self, labels, given, target):
        if given is not None:
            if not isinstance(given, list) or not all(isinstance(c, str) for c in given) or len(set(given)) != len(given):
                raise UserError(f"data_loader.args.class_names: expected a list of distinct class names, got {given!r}")
            return list(given)
        names = sorted(set(labels))
        if all(parse_number(n) is not None for n in names):
            names.sort(key=float)
        if len(names) < 2:
            raise UserError(f"{self.path}: column {target!r} holds one class only ({names[0]!r}); a classifier needs two or more"
                            ' (for a number to predict, set data_loader.args.task="regression")')
        return names


class TableDataset(Dataset):
    """A table in memory: float32 ``inputs`` (N, F) and ``targets`` (N,)."""

    def __init__(self, inputs, targets, class_names=None, feature_stats=None):
        self.inputs, self.targets = inputs.contiguous(), targets.contiguous()
        self.class_names, self.feature_stats = class_names, feature_stats
        self.input_shape = tuple(inputs.shape[1:])
        self.num_classes = len(class_names) if class_names else None

    def tensors(self):
        """``(inputs, targets)``, the dataset's own tensors (do not modify them in place)."""
        return self.inputs, self.targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        target = self.targets[index]
        return self.inputs[index], int(target) if self.class_names else target


def fit_standardisation(inputs, feature_names):
    """Mean and standard deviation of each column of ``inputs`` (a constant column gets std 1), as plain lists.

    Raises:
        UserError: a column whose statistics overflow float64 (values near 1e308), naming it.
    """
    mean = inputs.mean(dim=0)
    std = inputs.std(dim=0, unbiased=False)
    for name, m, s, top in zip(feature_names, mean.tolist(), std.tolist(), inputs.abs().amax(dim=0).tolist()):
        if not (math.isfinite(m) and math.isfinite(s)):
            raise UserError(f"column {name!r}: its mean ({m}) and standard deviation ({s}) over the training rows"
                            f" are not finite: values as large as {top:.3g} overflow; rescale the column (or leave it"
                            " out of data_loader.args.features)")
    std = torch.where(std > 0, std, torch.ones_like(std))
    return {"features": list(feature_names), "mean": mean.tolist(), "std": std.tolist()}


def fit_target(targets):
    """The regression target's mean and standard deviation (1 for a constant target), as plain numbers."""
    targets = targets.to(torch.float64)
    std = float(targets.std(unbiased=False))
    return {"mean": float(targets.mean()), "std": std if std > 0 else 1.0}


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_stats(stats, feature_names):
    """``stats`` (a saved run's ``feature_stats``) checked against this table's features. Its optional ``"target"``
    (``{"mean": m, "std": s}``) is the regression target's scaling; runs saved before it was kept have none."""
    target = stats.get("target", {"mean": 0, "std": 1}) if isinstance(stats, dict) else None
    ok = (isinstance(stats, dict) and set(stats) - {"target"} == {"features", "mean", "std"}
          and all(isinstance(stats[k], list) and len(stats[k]) == len(stats["features"]) for k in ("mean", "std"))
          and all(_number(v) for v in stats["mean"] + stats["std"]) and all(v > 0 for v in stats["std"])
          and isinstance(target, dict) and set(target) == {"mean", "std"} and all(_number(v) for v in target.values())
          and target["std"] > 0)
    if not ok:
        raise UserError('data_loader.args.feature_stats: expected {"features": [...], "mean": [...], "std": [...]} of equal'
                        ' lengths with positive stds (and optionally "target": {"mean": m, "std": s}), got'
                        f" {stats!r}")
    if stats["features"] != list(feature_names):
        raise UserError(f"data_loader.args.feature_stats: saved for features {stats['features']}, but the table gives {feature_names}")
    return stats


def standardise(inputs, stats):
    mean = torch.tensor(stats["mean"], dtype=torch.float64)
    std = torch.tensor(stats["std"], dtype=torch.float64)
    return ((inputs - mean) / std).to(torch.float32)


# --------------------------------------------------------------------------- the held-out test rows


# --------------------------------------------------------------------------- the loader


class CsvDataLoader(BaseDataLoader):
    """A CSV table: ``target`` column, numeric ``features`` (default: all other numeric columns), ``task``
    ``"classification"`` (class names from the target's values) or ``"regression"``.

    A ``test_split`` fraction (default 0.2; per class for classification) is held out, the
    same rows every time; ``validation_split`` as in every loader. With ``standardize``,
    each feature is scaled by the mean and standard deviation of the training rows only
    (neither validation nor test rows); ``loader.feature_stats`` holds them as plain lists. A
    regression target is standardised the same way (``feature_stats["target"]``). ``class_names``
    and ``feature_stats`` given (a saved run's) are used instead of being derived.
    """

    options_from = BaseDataLoader

    def __init__(self, path, target, features=None, task="classification", batch_size=64, shuffle=True,
                 validation_split=0.1, test_split=0.2, training=True, standardize=True, class_names=None,
                 feature_stats=None, delimiter=",", **options):
        table = Table(path, target, features, task, class_names, delimiter)
        fraction = check_fraction(test_split, "test_split")
        if task == "classification":
            train_idx, test_idx = stratified_split(table.targets, fraction, SPLIT_SEED)
        else:
            order = torch.randperm(len(table), generator=torch.Generator().manual_seed(SPLIT_SEED))
            count = round(fraction * len(table))
            train_idx, test_idx = order[count:].sort().values, order[:count].sort().values
        if not training and len(test_idx) == 0:
            raise UserError(f"data_loader.args.test_split: {test_split!r} holds out no rows of {table.path}; set test_split > 0")
        inputs, targets, stats = table.inputs, table.targets, None
        if standardize:
            if feature_stats is not None:
                stats = check_stats(feature_stats, table.feature_names)
            else:  # the rows that train: neither test nor validation rows inform the scaling
                fit_idx, _ = BaseDataLoader.split_indices(train_idx, validation_split, options.get("seed", 0))
                stats = fit_standardisation(table.inputs[fit_idx], table.feature_names)
                if task == "regression":
                    stats["target"] = fit_target(table.targets[fit_idx])
            inputs = standardise(inputs, stats)
            if task == "regression" and "target" in stats:  # (a run saved before targets were scaled has none)
                targets = ((targets.double() - stats["target"]["mean"]) / stats["target"]["std"]).to(torch.float32)
        inputs = inputs.to(torch.float32)
        for values, what in ((inputs, None), (targets, target)):
            if values.is_floating_point() and not bool(torch.isfinite(values).all()):
                row, *col = (~torch.isfinite(values)).nonzero()[0].tolist()
                name = table.feature_names[col[0]] if col else what
                raise UserError(f"{table.path} line {table.lines[row]}, column {name!r}: beyond float32's range"
                                f" (about 3.4e38){' once standardised' if standardize else ''}: rescale the column")
        dataset = TableDataset(inputs, targets, table.class_names, stats)
        indices = train_idx if training else test_idx
        super().__init__(dataset, batch_size, shuffle and training, validation_split if training else 0.0,
                         training=training, indices=indices.tolist(), **options)
        self.feature_names = table.feature_names

    def data_args(self):
        args = {}
        if self.class_names is not None:
            args["class_names"] = list(self.class_names)
        if self.feature_stats is not None:
            args["feature_stats"] = self.feature_stats
        return args


LOADERS = {"CsvDataLoader": CsvDataLoader}


# --------------------------------------------------------------------------- a regression task (utils/parts.py)

CLASSIFICATION_METRICS = ("accuracy", "top_k_acc", "torchmetrics.classification.")
CLASSIFICATION_LOSSES = ("cross_entropy", "nll_loss", "logsumexp_cross_entropy")


def target_stats(config):
    """The regression target's scaling kept in ``config`` (``{"mean": m, "std": s}``), or None."""
    args = config["data_loader"]["args"]
    return (args.get("feature_stats") or {}).get("target") if args.get("task") == "regression" else None


def check(config):
    """A regression task: no classification metric or loss, no built-in ``mae`` on a standardised target; each
    torchmetrics metric gets the target's scaling (``args.target_stats``) once the config holds it."""
    args = config["data_loader"]["args"]
    if args.get("task") != "regression":
        return []
    names = [m if isinstance(m, str) else m.get("type") if isinstance(m, dict) else None
             for m in config.get("metrics") or []]
    problems = []
    wrong = [n for n in names if isinstance(n, str) and n.startswith(CLASSIFICATION_METRICS)]
    if wrong:
        problems.append(f"metrics: {', '.join(wrong)} score{'s' if len(wrong) == 1 else ''} classes, but"
                        ' data_loader.args.task is "regression"; name regression metrics instead, e.g.'
                        ' {"type": "torchmetrics.regression.MeanAbsoluteError", "name": "mae"}'
                        " (see configs/csv_regression.json)")
    if "mae" in names and args.get("standardize", True):
        problems.append('metrics: the built-in "mae" would score the standardised target, not yours; name'
                        ' {"type": "torchmetrics.regression.MeanAbsoluteError", "name": "mae"} (scored in the'
                        " target's units), or set data_loader.args.standardize=false")
    loss = config["loss"]["type"] if isinstance(config.get("loss"), dict) else config.get("loss")
    if loss in CLASSIFICATION_LOSSES:
        problems.append(f'loss: {loss} is a classification loss, but data_loader.args.task is "regression"; use'
                        ' "mse_loss"')
    if not problems and (stats := target_stats(config)):
        with_scaling(config, stats)
    return problems


def with_scaling(config, stats):
    """Give every torchmetrics entry of ``config["metrics"]`` the target's scaling ``stats``."""
    for entry in config["metrics"]:
        if isinstance(entry, dict) and str(entry.get("type")).startswith("torchmetrics."):
            entry["args"] = {**(entry.get("args") or {}), "target_stats": dict(stats)}


def prepare(config, parts):
    """A run that has just fitted the target's scaling: its metrics (and its config) get it."""
    stats = (parts.data_loader.feature_stats or {}).get("target")
    if stats and config["data_loader"]["args"].get("task") == "regression":
        from trainer import build

        with_scaling(config, stats)
        parts.metric_fns = build.build_metrics(config)
