"""``trainer.ema``: an exponential moving average of the weights, scored in validation and by ``test.py``.

A part (utils/parts.py): delete this file and tests/parts/test_ema.py, and runs without
``trainer.ema`` train as before. In a config::

    "trainer": {"ema": true}                                   the defaults below
    "trainer": {"ema": {"decay": 0.99, "warmup": 100}}         some of them changed

The warm-up (``ramp``, on by default): after the run's n-th optimizer step the average moves by
``1 - min(decay, (1 + n) / (10 + n))``, the rule of TensorFlow's ExponentialMovingAverage
(``num_updates``) and timm's ModelEmaV3. The effective decay is 0.18 at the first step, 0.9 at the
80th and reaches 0.999 after 8,990 steps: the average follows the young model closely and settles
as the run goes on. Without it (``"ramp": false``) the average starts at the random initial weights
and, at decay 0.999, still holds over a third of them after 1,000 steps: a short run then scores
(validation, ``model_best.pth``, the test split) a model far behind its training weights.
"""

import contextlib
import json

import torch

from base.base_hook import Hook
from utils.config import boolean, non_negative_int, positive_int
from utils.config_extra import feature_settings, settings_of

DEFAULTS = {"decay": 0.999, "every_n_steps": 1, "warmup": 0, "ramp": True, "buffers": True}
CHECKS = {"decay": lambda v: None if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
          else "a number in [0, 1)", "every_n_steps": positive_int, "warmup": non_negative_int, "ramp": boolean,
          "buffers": boolean}


def effective_decay(decay, step, ramp=True):
    """The decay applied after the run's ``step``-th optimizer step: ``min(decay, (1 + step) / (10 + step))``
    with ``ramp``, else ``decay``."""
    return min(decay, (1 + step) / (10 + step)) if ramp else decay


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
    tensor at once. With ``ramp`` the decay is :func:`effective_decay` (see the module's docstring);
    for the first ``warmup`` steps the average is a copy of the weights.

    It is updated from the optimizer's step post-hook, so it sees every optimizer step, the
    run's last included, and none that an fp16 gradient scaler skipped; it costs nothing
    on the steps it skips but a counter. Under torchrun every process keeps its own copy:
    the weights are the same on every process after each step, so are the averages, and no
    communication is needed. Validation, ``model_best.pth``'s choice and ``test.py`` use the
    averaged weights (:meth:`swapped_in`); checkpoints hold them under ``"ema"``, with the
    training weights under ``"model"`` as always, so a resume continues both bit-exactly (the step
    count, which the ramp reads, is saved with them).
    """

    def __init__(self, model, optimizer, settings):
        self.decay, self.every, self.warmup = settings["decay"], settings["every_n_steps"], settings["warmup"]
        self.ramp = settings.get("ramp", False)
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
            weight = 1.0 - effective_decay(self.decay, self.updates, self.ramp)
            torch._foreach_lerp_(self._avg, self._live, weight)  # one fused kernel per device and dtype
        if self._avg_copied:
            torch._foreach_copy_(self._avg_copied, self._live_copied)

    def validating(self, trainer):
        return self.swapped_in()

    @contextlib.contextmanager
    def training(self, trainer):
        """Says, before the first step and after the last, which weights the scores are of."""
        from logger.logger import RESULT  # the end block's level: shown at every verbosity

        main = trainer.run.dist.is_main
        rule = f"decay min({self.decay:g}, (1+n)/(10+n)) at step n" if self.ramp else f"decay {self.decay:g}"
        if main:
            trainer.logger.info(f"EMA on ({rule}): validation, model_best.pth and the test score use the averaged weights")
        yield
        if main:
            trainer.logger.log(RESULT, "EMA: the validation values, model_best.pth and the test score below are the"
                                       " averaged weights'")

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
        # (an EMA state saved without its step count: the run's optimizer steps, which it counted)
        self.updates = (state.get("ema") or {}).get("updates", state.get("global_step", 0))
