"""The keys under which the processes of one torchrun round join the process group (torchrun only: utils/dist.py
imports it when it sets a process group up, so a run of one process never does).

The processes join through the store that torchrun names in ``MASTER_ADDR:MASTER_PORT``, where each
one publishes its address. torchrun keeps that store for the whole launch, so a round that torchrun
restarted (``--max-restarts``), or a second process group in the same processes, would find the
addresses of processes that are gone: each group needs keys of its own. torchrun's restart count
cannot name them: it counts a restart only on the node whose worker failed (the other nodes restart
theirs uncounted), so on several nodes the counts differ and the round would wait out the join timeout.

So the processes that join agree on a fresh number instead: rank 0 draws it from a counter in the
store and posts it; every other rank posts a ticket of its own under the number it reads, and goes on
once rank 0 has confirmed that ticket. A number an earlier round left in the store is never confirmed
(its rank 0 is gone), so the rank reads the number again until this round's rank 0 has posted its own.
"""

import time


def fresh_prefix(store, rank, world_size):
    """A key prefix that no earlier process group in ``store`` used, the same on every rank; waits for every rank."""
    if rank == 0:
        number = store.add("utils.dist/rounds", 1)
        store.set("utils.dist/round", str(number))
        for other in range(1, world_size):  # each get waits (up to the store's timeout) for that rank's ticket
            ticket = store.get(f"utils.dist/round{number}/rank{other}").decode()
            store.set(f"utils.dist/round{number}/ticket{ticket}", "")
        return f"utils.dist/round{number}/"
    ticket, posted = store.add("utils.dist/tickets", 1), None
    give_up = time.monotonic() + store.timeout.total_seconds()
    while time.monotonic() < give_up:
        number = store.get("utils.dist/round").decode()  # (waits for the launch's first number)
        if number != posted:
            store.set(f"utils.dist/round{number}/rank{rank}", str(ticket))
            posted = number
        if store.check([f"utils.dist/round{number}/ticket{ticket}"]):
            return f"utils.dist/round{number}/"
        time.sleep(0.02)  # polling: this round's rank 0 has not posted its number, or not confirmed the ticket yet
    raise TimeoutError(f"rank {rank}: rank 0 did not let this process join within {store.timeout} (round {posted})")
