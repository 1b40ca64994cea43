"""What each process holds and how long a step takes: FSDP (``trainer.strategy: "fsdp"``) against DDP.

    python benchmarks/fsdp.py              # 2 and 4 gloo processes on the CPU (about 2 minutes on 2 cores)
    python benchmarks/fsdp.py --smoke      # a small model, 2 processes, a few steps: checks it runs
    python benchmarks/fsdp.py --nccl       # on GPUs: NCCL, one process per GPU (needs as many GPUs)

Each launch (``torchrun --standalone``) trains the same MLP (8 Linear layers of 1024 x 1024, about 8.4 million
parameters, Adam) on random batches of 32 per process, wrapped in DDP or sharded as the template shards it
(trainer/fsdp.py: every Linear a block, then the root). It reports, per process, the parameter, gradient and
optimizer-state bytes after the first step (what each process holds: with FSDP the shards), and the median time
of a step (forward, backward, the gradients' all-reduce or reduce-scatter, the optimizer) over the timed steps.
On the CPU the collectives go through gloo over the loopback device, and the processes share the cores, so the
step times say how FSDP's extra gathers compare, not what a cluster would see.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def worker(strategy, width, depth, steps, out):
    """One process of a launch: build, wrap or shard, step, measure; rank 0 writes the figures to ``out``."""
    sys.path.insert(0, str(REPO))
    import torch
    import torch.distributed as dist

    from trainer.fsdp import ShardedModule, choose_blocks, local_bytes

    cuda = os.environ.get("BENCH_NCCL") == "1"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    layers = [m for _ in range(depth) for m in (torch.nn.Linear(width, width), torch.nn.ReLU())]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10)).to(device)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for name in choose_blocks(model, width * width):  # every Linear of width x width
            fully_shard(model.get_submodule(name))
        fully_shard(model)
        model.__class__ = type("Sharded", (ShardedModule, type(model)), {})
        forward = model
    else:
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = torch.randn(32, width, device=device)
    target = torch.randint(0, 10, (32,), device=device)
    times = []
    for step in range(steps + 2):  # two untimed: the optimizer's state is made at the first
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(forward(data), target).backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - started)
    params = local_bytes(model.parameters())
    grads = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
    state = local_bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    figures = torch.tensor([params, grads, state, statistics.median(times)], dtype=torch.float64)
    gathered = [torch.zeros_like(figures) for _ in range(world)]
    dist.all_gather(gathered, figures.to(device) if cuda else figures)
    if rank == 0:
        rows = [g.cpu().tolist() for g in gathered]
        Path(out).write_text(json.dumps({"strategy": strategy, "world": world, "rows": rows}))
    dist.barrier()
    dist.destroy_process_group()


def launch(strategy, world, args, folder):
    out = Path(folder) / f"{strategy}{world}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), BENCH_NCCL="1" if args.nccl else "0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__,
           "--worker", strategy, "--width", str(args.width), "--depth", str(args.depth), "--steps", str(args.steps),
           "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: the {strategy} launch of {world} processes failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(out.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a small model, 2 processes, 3 steps")
    parser.add_argument("--nccl", action="store_true", help="NCCL on GPUs, one process per GPU")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.width, args.depth, args.steps, args.out)
    if args.smoke:
        args.worlds, args.width, args.depth, args.steps = [2], 64, 2, 3
    mib = 2 ** 20
    print(f"MLP {args.depth} x Linear({args.width}, {args.width}), Adam, batch 32 per process;"
          f" {'NCCL' if args.nccl else 'gloo, CPU'}; median of {args.steps} steps")
    print(f"{'strategy':8} {'procs':>5} {'params MiB':>10} {'grads MiB':>9} {'optim MiB':>9} {'total MiB':>9}"
          f" {'x DDP':>6} {'step ms':>8}")
    with tempfile.TemporaryDirectory() as folder:
        for world in args.worlds:
            ddp_total = None
            for strategy in ("ddp", "fsdp"):
                result = launch(strategy, world, args, folder)
                worst = max(result["rows"], key=lambda r: sum(r[:3]))  # the process holding most
                total = sum(worst[:3])
                ddp_total = ddp_total or total
                step = statistics.median(r[3] for r in result["rows"]) * 1000
                print(f"{strategy:8} {world:5d} {worst[0] / mib:10.2f} {worst[1] / mib:9.2f} {worst[2] / mib:9.2f}"
                      f" {total / mib:9.2f} {total / ddp_total:6.2f} {step:8.1f}")


if __name__ == "__main__":
    main()
