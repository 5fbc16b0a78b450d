"""Who masks with whom: the complete graph (SecAgg) or a random Harary graph (SecAgg+).

A random Harary graph H(n, k), k even (Bell et al. 2020, Sec. 4): place the n
clients on a ring in the order of a uniformly random permutation and join each
to the k/2 nearest clients on either side. The permutation comes from public
round randomness (the session id): ``RandomSource(seed).child("secagg+/harary")``
draws one 64-bit key per client and the ring is the clients sorted by key (ties,
probability < n^2 / 2^65, broken by index), so every party derives the same
graph and nobody chooses it alone. See ``protocols/secagg.md`` (graphs).
"""

from __future__ import annotations

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError

__all__ = ["MaskingGraph"]


class MaskingGraph:
    """An undirected graph on clients 0..n-1; ``neighbors(u)`` excludes u and is ascending."""

    __slots__ = ("_closed", "_neighbors", "_order", "_pos", "complete", "degree", "n")

    def __init__(self, n: int, degree: int, order: np.ndarray | None) -> None:
        self.n, self.degree, self.complete = n, degree, order is None
        self._order = order
        self._pos = None if order is None else np.argsort(order)
        self._neighbors: dict[int, np.ndarray] = {}  # computed on demand, read-only
        self._closed: dict[int, np.ndarray] = {}

    @classmethod
    def complete_graph(cls, n: int) -> MaskingGraph:
        """Every client is a neighbour of every other (degree n - 1)."""
        if n < 1:
            raise ConfigurationError(f"a graph needs n >= 1 clients, got {n}")
        return cls(n, n - 1, None)

    @classmethod
    def harary(cls, n: int, degree: int, seed: bytes) -> MaskingGraph:
        """The random Harary graph H(n, degree) whose ring order is drawn from `seed`.

        ``degree >= n - 1`` gives the complete graph. Raises ConfigurationError for an
        odd or negative degree.
        """
        if degree % 2 or degree < 0:
            raise ConfigurationError(f"a Harary degree must be even and >= 0, got {degree}")
        if degree >= n - 1:
            return cls.complete_graph(n)
        keys = RandomSource(bytes(seed)).child("secagg+/harary").fill(np.empty(n, dtype=np.uint64))
        return cls(n, degree, np.argsort(keys, kind="stable"))

    def __repr__(self) -> str:
        kind = "complete" if self.complete else "harary"
        return f"MaskingGraph({kind}, n={self.n}, degree={self.degree})"

    def neighbors(self, u: int) -> np.ndarray:
        """The neighbours of u, ascending (read-only int64 array)."""
        nb = self._neighbors.get(u)
        if nb is None:
            if not 0 <= u < self.n:
                raise ValueError(f"client {u} is not in 0..{self.n - 1}")
            if self._order is None:
                nb = np.delete(np.arange(self.n, dtype=np.int64), u)
            else:
                h = self.degree // 2
                p = int(self._pos[u])  # type: ignore[index]
                ring = (p + np.concatenate((np.arange(-h, 0), np.arange(1, h + 1)))) % self.n
                nb = np.sort(self._order[ring].astype(np.int64))
            nb.flags.writeable = False
            self._neighbors[u] = nb
        return nb

    def closed_neighborhood(self, u: int) -> np.ndarray:
        """u and its neighbours, ascending (read-only): the holders of u's shares."""
        closed = self._closed.get(u)
        if closed is None:
            nb = self.neighbors(u)
            closed = np.insert(nb, np.searchsorted(nb, u), u)
            closed.flags.writeable = False
            self._closed[u] = closed
        return closed

    def are_neighbors(self, u: int, v: int) -> bool:
        """Whether u and v share a pairwise mask."""
        if u == v:
            return False
        if self._order is None:
            return True
        d = abs(int(self._pos[u]) - int(self._pos[v]))  # type: ignore[index]
        return min(d, self.n - d) <= self.degree // 2
