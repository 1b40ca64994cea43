"""Sample-weighted sums of the loss and the metrics, kept on the device."""

import torch


class MetricTracker:
    """Accumulates ``value * batch_size`` for each name; :meth:`result` divides by the sample count.

    The sums stay on the device, so :meth:`update` never forces a host-device sync;
    :meth:`result` reads them back (and, under ``torch.distributed``, sums them over
    all processes first, so every process gets the numbers of the whole dataset).
    """

    def __init__(self, names, device):
        self.names = list(names)
        # float64 keeps long sums exact enough; MPS has no float64.
        self.dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        self.sums = torch.zeros(len(self.names), dtype=self.dtype, device=device)
        self.count = 0
        self._values, self._sizes = [], []  # batches not yet added to the sums

    def reset(self):
        self.sums.zero_()
        self.count = 0
        self._values, self._sizes = [], []

    def update(self, values, n):
        """Add one batch: ``values`` are 0-d tensors in the order of ``names``, ``n`` the batch's sample count.

        This runs every step, so it only queues the tensors: a handful of tiny tensor ops
        per step would cost a few percent of a small model's step time. They are summed, in
        one go, when read (and every few hundred batches, to bound the queue).
        """
        self._values += values
        self._sizes.append(n)
        self.count += n
        if len(self._sizes) >= 512:
            self._flush()

    def _flush(self):
        if not self._sizes:
            return
        values = torch.stack(self._values).to(self.dtype).view(len(self._sizes), len(self.names))
        sizes = torch.tensor(self._sizes, dtype=self.dtype, device=values.device)
        self.sums += (values * sizes[:, None]).sum(0)
        self._values, self._sizes = [], []

    def totals(self):
        """The sample-weighted sums so far (a tensor on the device)."""
        self._flush()
        return self.sums

    def result(self, reduce=False):
        """The mean of each name over all samples seen; ``reduce=True`` sums over processes first."""
        sums = self.totals()
        count = torch.tensor(float(self.count), dtype=self.dtype, device=sums.device)
        if reduce:
            import torch.distributed as dist

            both = torch.cat([sums, count.view(1)])
            dist.all_reduce(both)
            sums, count = both[:-1], both[-1]
        values = (sums / count.clamp(min=1)).tolist()
        return dict(zip(self.names, values))

    def state_dict(self, reduce=False):
        """The running sums and count; ``reduce=True`` (a collective) sums them over all processes first."""
        sums, count = self.totals().detach(), self.count
        if reduce:
            import torch.distributed as dist

            both = torch.cat([sums, torch.tensor([float(count)], dtype=self.dtype, device=sums.device)])
            dist.all_reduce(both)
            sums, count = both[:-1], int(both[-1].item())
        return {"sums": sums.cpu(), "count": count}

    def load_state_dict(self, state):
        self._values, self._sizes = [], []
        self.sums.copy_(state["sums"])
        self.count = state["count"]

    def mark(self):
        """A snapshot for :meth:`rollback`: one copy of the small sums tensor, the queue by reference (its
        tensors are never changed in place)."""
        return self.sums.clone(), self.count, list(self._values), list(self._sizes)

    def rollback(self, mark):
        """Return to the state of :meth:`mark`: the batches added since are forgotten."""
        sums, self.count, values, sizes = mark
        self.sums.copy_(sums)
        self._values, self._sizes = list(values), list(sizes)
