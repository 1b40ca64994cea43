"""Evaluate a checkpoint on its config's held-out test split: ``python test.py -r model_best.pth``.

Prints the loss and metrics and writes them as JSON beside the checkpoint
(``model_best.test.json`` for ``model_best.pth``).
"""

import argparse
import sys
from pathlib import Path

from utils.config import apply_overrides, validate_config
from utils.errors import UserError
from utils.io import load_checkpoint, write_json


def main(resume, overrides=(), device=None, write=True):
    """Evaluate the checkpoint ``resume``; returns ``{"loss": ..., "<metric>": ..., "n_samples": N}``.

    ``overrides`` (``key.path=VALUE``) change the checkpoint's config, e.g. ``data_loader.args.data_dir=...``.
    """
    import torch

    from trainer import build
    from trainer.trainer import evaluate

    state = load_checkpoint(resume)
    config = apply_overrides(state["config"], list(overrides) + ([f"device={device}"] if device else []))
    config = validate_config(config, build.registries())
    device = build.resolve_device(config["device"])
    loader = build.build_data_loader(config, training=False)
    model = build.build_model(config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise UserError(f"{resume}: the weights do not fit the model its config builds ({str(err).splitlines()[0]})") from None
    model.to(device)
    loader.to(device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config["trainer"]["amp"])
    autocast = torch.autocast(device.type, dtype=amp) if amp and device.type != "cpu" else None
    metrics = evaluate(model, loader, build.build_loss(config), build.build_metrics(config), device, autocast,
                       progress=config["trainer"]["verbosity"] > 0)
    metrics["n_samples"] = len(loader.sampler)
    if write:
        write_json(Path(resume).with_suffix(".test.json"), {"checkpoint": str(resume), **metrics})
    return metrics


def cli(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint on the test split of its config.")
    parser.add_argument("-r", "--resume", required=True, help="checkpoint to evaluate")
    parser.add_argument("-d", "--device", help='device override ("cpu", "cuda", ...)')
    parser.add_argument("overrides", nargs="*", metavar="key.path=VALUE", help="change a key of the checkpoint's config")
    args = parser.parse_args(argv)
    try:
        metrics = main(args.resume, args.overrides, args.device)
    except UserError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    for key, value in metrics.items():
        print(f"    {key:15s}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
