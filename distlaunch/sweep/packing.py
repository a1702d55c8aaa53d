"""Packing concurrent trials onto the hosts a sweep has: each trial takes ``nodes`` hosts
with ``ppn`` free slots each and gives them back when it ends, so no two trials ever
share a slot. Pure bookkeeping, no processes."""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import SpecError


class SlotPool:
    """Free slots per host, in the hosts' order (a trial takes the first that fit)."""

    def __init__(self, hosts: Sequence[tuple[str, int]]) -> None:
        if not hosts:
            raise SpecError("a sweep needs at least one host")
        self.total = dict(hosts)
        self.free = dict(hosts)

    def fits_ever(self, nodes: int, ppn: int) -> bool:
        """Whether one trial of this shape fits when nothing else runs."""
        return sum(1 for slots in self.total.values() if slots >= ppn) >= nodes

    def capacity(self, nodes: int, ppn: int) -> int:
        """How many trials of this shape fit at once on the empty pool."""
        per_host = sorted((slots // ppn for slots in self.total.values()), reverse=True)
        count = 0
        while True:
            taken = [i for i, n in enumerate(per_host) if n > 0][:nodes]
            if len(taken) < nodes:
                return count
            for i in taken:
                per_host[i] -= 1
            per_host.sort(reverse=True)
            count += 1

    def take(self, nodes: int, ppn: int) -> list[tuple[str, int]] | None:
        """``nodes`` hosts with ``ppn`` slots each, now taken; None when they are not free.
        The hosts with the most free slots first, so trials spread out."""
        ready = sorted((host for host, free in self.free.items() if free >= ppn), key=lambda h: -self.free[h])
        if len(ready) < nodes:
            return None
        chosen = sorted(ready[:nodes], key=list(self.free).index)
        for host in chosen:
            self.free[host] -= ppn
        return [(host, ppn) for host in chosen]

    def give_back(self, taken: Sequence[tuple[str, int]]) -> None:
        for host, count in taken:
            self.free[host] = min(self.total[host], self.free[host] + count)
