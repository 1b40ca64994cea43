"""``trainer.ema``: an exponential moving average of the weights, scored in validation and by ``test.py``.

A part (utils/parts.py): delete this file and tests/parts/test_ema.py, and runs without
``trainer.ema`` train as before. In a config::

    "trainer": {"ema": true}                                   the defaults below
    "trainer": {"ema": {"decay": 0.99, "warmup": 100}}         some of them changed
"""

import contextlib
import json

import torch

from base.base_trainer import Hook
from utils.config import boolean, feature_settings, non_negative_int, positive_int, settings_of

DEFAULTS = {"decay": 0.999, "every_n_steps": 1, "warmup": 0, "buffers": True}
CHECKS = {"decay": lambda v: None if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
          else "a number in [0, 1)", "every_n_steps": positive_int, "warmup": non_negative_int, "buffers": boolean}


def check(config):
    """``trainer.ema``: null/false (off), true (the defaults) or a mapping of some of them."""
    value = config["trainer"].get("ema")
    wanted = feature_settings(DEFAULTS, CHECKS)(value)
    return [f"trainer.ema: got {json.dumps(value)}, expected {wanted}"] if wanted else []


def hooks(config, parts, run):
    settings = settings_of(config["trainer"].get("ema"), DEFAULTS)
    return [EMA(parts.model, parts.optimizer, settings)] if settings else []


def evaluated_weights(state):
    """The weights ``test.py``, ``predict.py`` and ``export.py`` load: the average, which validation scored."""
    return (state.get("ema") or {}).get("weights")


class EMA(Hook):
    """``trainer.ema``: an exponential moving average of the weights, used wherever the model is evaluated.

    After every ``every_n_steps``-th optimizer step, ``average = decay * average + (1 - decay) * weights``
    over all parameters (and the floating-point buffers, such as batch-norm statistics, with
    ``buffers``; integer buffers are copied), as one fused ``torch._foreach_lerp_`` over every
    tensor at once. For the first ``warmup`` steps the average is a copy of the weights.

    It is updated from the optimizer's step post-hook, so it sees every optimizer step, the
    run's last included, and none that an fp16 gradient scaler skipped; it costs nothing
    on the steps it skips but a counter. Under torchrun every process keeps its own copy:
    the weights are the same on every process after each step, so are the averages, and no
    communication is needed. Validation, ``model_best.pth``'s choice and ``test.py`` use the
    averaged weights (:meth:`swapped_in`); checkpoints hold them under ``"ema"``, with the
    training weights under ``"model"`` as always, so a resume continues both bit-exactly.
    """

    def __init__(self, model, optimizer, settings):
        self.decay, self.every, self.warmup = settings["decay"], settings["every_n_steps"], settings["warmup"]
        params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        live = {name: t.detach() for name, t in model.state_dict(keep_vars=True).items()}
        kept = {name: t for name, t in live.items() if name in params or settings["buffers"]}
        self.averaged = [name for name, t in kept.items() if t.is_floating_point()]
        self.copied = [name for name, t in kept.items() if not t.is_floating_point()]
        self.weights = {name: t.clone() for name, t in kept.items()}  # the average, by the model's own names
        # The same tensors as lists, for the foreach ops; the live ones share storage with the model's.
        self._live = [live[n] for n in self.averaged]
        self._avg = [self.weights[n] for n in self.averaged]
        self._live_copied = [live[n] for n in self.copied]
        self._avg_copied = [self.weights[n] for n in self.copied]
        self.updates = 0  # optimizer steps seen
        optimizer.register_step_post_hook(self._after_optimizer_step)

    @torch.no_grad()
    def _after_optimizer_step(self, optimizer, args, kwargs):
        self.updates += 1
        if self.updates % self.every:
            return
        if self.updates <= self.warmup:
            torch._foreach_copy_(self._avg, self._live)
        else:
            torch._foreach_lerp_(self._avg, self._live, 1.0 - self.decay)  # one fused kernel per device and dtype
        if self._avg_copied:
            torch._foreach_copy_(self._avg_copied, self._live_copied)

    def validating(self, trainer):
        return self.swapped_in()

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the averaged weights inside the block, and its own (bit-identical) afterwards."""
        live, average = self._live + self._live_copied, self._avg + self._avg_copied
        with torch.no_grad():
            backup = [t.clone() for t in live]
            torch._foreach_copy_(live, average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, backup)

    def state_dict(self):
        return {"ema": {"weights": self.weights, "updates": self.updates}}

    @torch.no_grad()
    def load_state_dict(self, trainer, state):
        # A checkpoint of a run without EMA starts the average at the weights it resumes.
        saved = (state.get("ema") or {}).get("weights") or {}
        for name, tensor in self.weights.items():
            source = saved.get(name, state["model"].get(name))
            if source is not None:
                tensor.copy_(source)
        self.updates = (state.get("ema") or {}).get("updates", 0)
