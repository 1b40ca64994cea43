"""``trainer.strategy: "fsdp"``: the model sharded over the processes of a torchrun launch with FSDP2
(``torch.distributed.fsdp.fully_shard``), and what each process holds. Imported by trainer/run.py only for such a run
(and for the bytes line of any torchrun run); its checkpoints are DCP folders (utils/sharded.py).

Each process keeps 1/N of every parameter, of its gradient and of the optimizer's state. A block (a module named in
``trainer.fsdp_blocks``, or by default every smallest module holding at least ``DEFAULT_BLOCK_PARAMS`` parameters)
is gathered whole just for its own forward and backward, then freed again; the root holds the rest. The step itself
is the DDP step: gradients are reduce-scattered (averaged) on an accumulation window's last batch only, clipping
and the non-finite check work on the shards (the norm is reduced over the processes), and the frozen parameters of
``trainer.freeze`` stay frozen.

Validation runs the same number of batches on every process only when the split divides evenly, and each forward
of a sharded model is a collective: so for each validation the whole model is gathered once (the parameters only:
usually a quarter of what training holds with Adam) and sharded again after it (:class:`GatheredForValidation`, a
hook of trainer/extras.py's core_hooks).
"""

import contextlib
import fnmatch
import os

import torch

from utils.errors import ConfigError

DEFAULT_BLOCK_PARAMS = 10_000_000  # trainer.fsdp_blocks null: every smallest module holding at least this many


def place(config, parts, info):
    """Under torchrun or ``"fsdp"``: the model wrapped in DDP (``parts.wrap``) or sharded (:func:`shard`); returns
    the line saying what each process holds."""
    if config["trainer"]["strategy"] == "fsdp":
        return shard(config, parts, info)
    parts.forward_model = parts.wrap(parts.model)
    return bytes_line(parts.model, parts.optimizer, "ddp", info.world_size)


def shard(config, parts, info):
    """Shard ``parts.model`` in place (its blocks, then the root) and rebuild the optimizer and scheduler over the
    sharded parameters; returns the line of :func:`bytes_line`. ConfigError (nothing written yet): not under
    torchrun, a block name that names no module, activation checkpointing without blocks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from trainer import build
    from utils.config import init_obj

    cfg = config["trainer"]
    if "RANK" not in os.environ:
        raise ConfigError('trainer.strategy: "fsdp" shards the model over the processes of a torchrun launch, but'
                          ' this is no torchrun launch; start it with torchrun (README: Clusters), or use "ddp"')
    if not torch.distributed.is_initialized():  # torchrun with one process: a group of one, for the same code
        torch.distributed.init_process_group("nccl" if parts.device.type == "cuda" else "gloo",
                                             store=torch.distributed.HashStore(), rank=0, world_size=1)
    model = parts.model
    blocks = choose_blocks(model, cfg["fsdp_blocks"])
    if cfg["activation_checkpointing"]:
        if not blocks:
            raise ConfigError("trainer.activation_checkpointing: the model has no block to recompute (none holds"
                              f" {cfg['fsdp_blocks'] or DEFAULT_BLOCK_PARAMS} parameters); name them in"
                              " trainer.fsdp_blocks, or leave it false")
        for name in blocks:
            recompute_in_backward(model.get_submodule(name))
    # bf16: the gathered parameters (and so the compute) in bf16, the gradients reduced and the shards kept in fp32.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cfg["amp"] else None
    for name in sorted(blocks, key=lambda n: -n.count(".")):  # inner blocks first
        fully_shard(model.get_submodule(name), **({"mp_policy": policy} if policy else {}))
    fully_shard(model, **({"mp_policy": policy} if policy else {}))
    model.__class__ = type(f"Sharded{type(model).__name__}", (ShardedModule, type(model)), {})
    # fully_shard replaced the parameters by sharded ones: the optimizer and the scheduler are built over those.
    parts.optimizer = build.build_optimizer(model, config, parts.device)
    if section := config.get("lr_scheduler"):
        parts.lr_scheduler = init_obj(section, build.registries()["lr_scheduler"], parts.optimizer,
                                      where="lr_scheduler")
    parts.forward_model, parts.wrap = model, lambda m: m  # (an unfreezing re-wraps: nothing to do here)
    shown = f"blocks {', '.join(blocks)} and the root" if blocks else "one block, the whole model"
    return bytes_line(model, parts.optimizer, "fsdp", info.world_size) + f" ({shown})"


def choose_blocks(model, spec):
    """The names of the modules sharded as blocks: those matching the globs of ``spec`` (a list), or the smallest
    modules holding at least ``spec`` (an int; None: :data:`DEFAULT_BLOCK_PARAMS`) parameters."""
    modules = {name: module for name, module in model.named_modules() if name}
    if isinstance(spec, list):
        chosen = []
        for pattern in spec:
            hits = [name for name in modules if fnmatch.fnmatchcase(name, pattern)]
            if not hits:
                raise ConfigError(f"trainer.fsdp_blocks: {pattern!r} names no module of the model; modules are named"
                                  f" like {', '.join(list(modules)[:8])}")
            chosen += [name for name in hits if name not in chosen]
        return chosen
    least = spec or DEFAULT_BLOCK_PARAMS
    count = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    return [name for name, module in modules.items() if count[name] >= least
            and not any(count[f"{name}.{child}"] >= least for child, _ in module.named_children())]


def recompute_in_backward(block):
    """``trainer.activation_checkpointing``: ``block`` keeps only its input; its activations are recomputed in the
    backward pass (with the random state of the forward: dropout draws the same)."""
    from torch.utils.checkpoint import checkpoint

    forward = block.forward
    block.forward = lambda *args, **kwargs: checkpoint(forward, *args, use_reentrant=False, **kwargs)


class ShardedModule:
    """``no_sync()``, what the Trainer's step asks of a model under torchrun (DDP's name), for a sharded one: the
    batches of an accumulation window but its last keep their gradients unreduced."""

    @contextlib.contextmanager
    def no_sync(self):
        self.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.set_requires_gradient_sync(True)


def local_bytes(tensors):
    """Bytes of ``tensors`` held by this process (of a sharded one, its shard)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def state_per_parameter(optimizer):
    """How many values of optimizer state the optimizer keeps per trainable value (Adam 2, SGD with momentum 1),
    tried on a stand-in parameter (no step of the real one); None if it cannot be tried."""
    skip = ("params", "initial_lr", "fused", "foreach", "capturable", "differentiable")
    probe = torch.nn.Parameter(torch.zeros(4))
    probe.grad = torch.zeros(4)
    try:
        trial = type(optimizer)([{**{k: v for k, v in optimizer.param_groups[0].items() if k not in skip},
                                  "params": [probe]}])
        trial.step()
    except Exception:
        return None
    return sum(t.numel() for t in trial.state[probe].values() if torch.is_tensor(t) and t.shape == probe.shape) / 4


def process_bytes(model, optimizer):
    """``(parameters, gradients, optimizer state)`` bytes this process holds once training steps (the state of the
    optimizer as :func:`state_per_parameter` predicts it: it is made at the first step)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    params, grads = local_bytes(model.parameters()), local_bytes(trainable)
    per = state_per_parameter(optimizer)
    return params, grads, None if per is None else int(per * grads)


def bytes_line(model, optimizer, strategy, world_size):
    """The start-of-run line: what each process holds, and the total."""
    params, grads, state = process_bytes(model, optimizer)

    def mb(n):
        return "?" if n is None else f"{n / 2**20:.3g} MiB"
    return (f"Per process ({strategy}, {world_size} processes): parameters {mb(params)}, gradients {mb(grads)},"
            f" optimizer state {mb(state)}; {mb(params + grads + (state or 0))} in all")
