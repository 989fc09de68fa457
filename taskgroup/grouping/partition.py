"""Graph partitioning of tasks on the symmetrised affinity graph (networkx, scikit-learn).

The affinity matrix ``A[i, j]`` (source i -> target j) is symmetrised, ``S = (A + A.T) / 2``,
with a zero diagonal: an undirected weighted graph of tasks. Negative affinity (i hurts j) is a
real signal, and each method treats signed weights explicitly:

- ``louvain`` (networkx ``louvain_communities``, a resolution sweep) and ``greedy_modularity``
  (``greedy_modularity_communities``): modularity is defined for non-negative weights, so these
  see only the positive part of S; a negative pair is "no attraction", never an attraction.
- ``kernighan_lin``: recursive bisection (``kernighan_lin_bisection``, which minimises the cut
  weight and works with signed weights: cutting a negative edge lowers the cut), started from
  every cut size along the leading eigenvector of S because KL keeps the sizes it starts with; a
  group is split only while the affinity across its best cut is negative (the halves hurt each
  other).
- ``spectral`` (scikit-learn ``SpectralClustering``, precomputed affinity): needs non-negative
  similarities, so S is mapped through ``exp(S / s)`` with s the spread of the off-diagonal
  entries; negative pairs become weak, not zero.
- ``agglomerative`` (scikit-learn, average linkage, precomputed distance ``max(S) - S``): signed
  values enter the distance directly.

Every method returns a partition covering every task, deterministic for a given seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import networkx as nx
import numpy as np

METHODS = ("louvain", "greedy_modularity", "kernighan_lin", "spectral", "agglomerative")


@dataclasses.dataclass(frozen=True)
class Partition:
    """A grouping proposal: disjoint groups covering the tasks, and how it was found."""

    method: str
    groups: tuple[tuple[str, ...], ...]
    params: tuple[tuple[str, float], ...] = ()

    def labels(self, tasks: Sequence[str]) -> list[int]:
        """Group index of each task (for the adjusted Rand index)."""
        where = {t: g for g, group in enumerate(self.groups) for t in group}
        return [where[t] for t in tasks]


def symmetrise(matrix: np.ndarray) -> np.ndarray:
    """(A + A.T) / 2 with a zero diagonal; NaN (unmeasured) entries count as 0."""
    a = np.nan_to_num(np.asarray(matrix, dtype=float))
    s = (a + a.T) / 2
    np.fill_diagonal(s, 0.0)
    return s


def _graph(s: np.ndarray, tasks: Sequence[str], positive_only: bool) -> nx.Graph:
    graph = nx.Graph()
    graph.add_nodes_from(tasks)
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            w = float(s[i, j])
            if w > 0 or (not positive_only and w != 0):
                graph.add_edge(tasks[i], tasks[j], weight=w)
    return graph


def canonical_groups(groups, tasks: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Non-empty groups, members in task order, groups in the order of their first member."""
    order = {t: k for k, t in enumerate(tasks)}
    sorted_groups = [tuple(sorted(g, key=order.__getitem__)) for g in groups if len(g)]
    return tuple(sorted(sorted_groups, key=lambda g: order[g[0]]))


def _from_labels(labels: Sequence[int], tasks: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    groups: dict[int, list[str]] = {}
    for t, lab in zip(tasks, labels, strict=True):
        groups.setdefault(int(lab), []).append(t)
    return canonical_groups(groups.values(), tasks)


def louvain(s: np.ndarray, tasks: Sequence[str], resolution: float = 1.0, seed: int = 0) -> Partition:
    groups = nx.community.louvain_communities(
        _graph(s, tasks, positive_only=True), weight="weight", resolution=resolution, seed=seed
    )
    return Partition("louvain", canonical_groups(groups, tasks), (("resolution", resolution),))


def greedy_modularity(s: np.ndarray, tasks: Sequence[str], resolution: float = 1.0) -> Partition:
    graph = _graph(s, tasks, positive_only=True)
    if graph.number_of_edges() == 0:
        groups = [[t] for t in tasks]
    else:
        groups = nx.community.greedy_modularity_communities(graph, weight="weight", resolution=resolution)
    return Partition("greedy_modularity", canonical_groups(groups, tasks), (("resolution", resolution),))


def _best_bisection(graph: nx.Graph, s: np.ndarray, group: list[str], index, seed: int):
    """The most negative cut of ``group`` found by Kernighan-Lin. KL swaps pairs and so keeps the
    sizes of its start: it is started from every size of cut along the order of the leading
    eigenvector of S (which puts the most mutually attracted tasks together)."""
    sub = s[np.ix_([index[t] for t in group], [index[t] for t in group])]
    order = [group[k] for k in np.argsort(np.linalg.eigh(sub)[1][:, -1], kind="stable")]
    best = None
    for m in range(1, len(group) // 2 + 1):
        a, b = nx.community.kernighan_lin_bisection(
            graph.subgraph(group), partition=(set(order[:m]), set(order[m:])), weight="weight", seed=seed
        )
        cut = sum(s[index[x], index[y]] for x in a for y in b)
        if best is None or cut < best[0] - 1e-12:
            best = (cut, a, b)
    return best


def bisect(
    s: np.ndarray, tasks: Sequence[str], group: Sequence[str], seed: int = 0
) -> tuple[tuple[str, ...], ...]:
    """The best Kernighan-Lin cut of ``group`` into two (whatever the sign of its weight): how
    the search splits a proposed group into candidates."""
    index = {t: k for k, t in enumerate(tasks)}
    graph = _graph(s, tasks, positive_only=False)
    _, a, b = _best_bisection(graph, s, list(group), index, seed)
    return canonical_groups([a, b], tasks)


def kernighan_lin(s: np.ndarray, tasks: Sequence[str], seed: int = 0) -> Partition:
    index = {t: k for k, t in enumerate(tasks)}
    graph = _graph(s, tasks, positive_only=False)
    done, todo = [], [list(tasks)]
    while todo:
        group = todo.pop()
        if len(group) < 2:
            done.append(group)
            continue
        cut, a, b = _best_bisection(graph, s, group, index, seed)
        if cut < 0:  # the halves hurt each other: split, and look inside each
            todo += [sorted(a, key=index.__getitem__), sorted(b, key=index.__getitem__)]
        else:
            done.append(group)
    return Partition("kernighan_lin", canonical_groups(done, tasks))


def spectral(s: np.ndarray, tasks: Sequence[str], n_groups: int, seed: int = 0) -> Partition:
    from sklearn.cluster import SpectralClustering

    off = s[~np.eye(len(tasks), dtype=bool)]
    scale = float(off.std()) or 1.0
    affinity = np.exp(s / scale)
    np.fill_diagonal(affinity, 0.0)
    labels = SpectralClustering(n_groups, affinity="precomputed", random_state=seed).fit(affinity).labels_
    return Partition("spectral", _from_labels(labels, tasks), (("n_groups", n_groups),))


def agglomerative(s: np.ndarray, tasks: Sequence[str], n_groups: int) -> Partition:
    from sklearn.cluster import AgglomerativeClustering

    distance = s.max() - s
    np.fill_diagonal(distance, 0.0)
    labels = AgglomerativeClustering(n_groups, metric="precomputed", linkage="average").fit(distance).labels_
    return Partition("agglomerative", _from_labels(labels, tasks), (("n_groups", n_groups),))


class GraphPartitioner:
    """scikit-learn-style grouper: ``GraphPartitioner("louvain").fit(A, tasks).groups_``.

    ``n_groups`` is needed by ``spectral`` and ``agglomerative``; ``resolution`` by the
    modularity methods."""

    def __init__(
        self, method: str = "louvain", n_groups: int | None = None, resolution: float = 1.0, seed: int = 0
    ):
        if method not in METHODS:
            raise ValueError(f"unknown partition method {method!r}; valid: {', '.join(METHODS)}")
        if method in ("spectral", "agglomerative") and not n_groups:
            raise ValueError(f"{method} needs n_groups")
        self.method = method
        self.n_groups = n_groups
        self.resolution = resolution
        self.seed = seed

    def fit(self, matrix: np.ndarray, tasks: Sequence[str]) -> GraphPartitioner:
        if np.shape(matrix) != (len(tasks), len(tasks)):
            raise ValueError(f"affinity matrix of shape {np.shape(matrix)} for {len(tasks)} tasks")
        s = symmetrise(matrix)
        if self.method == "louvain":
            self.partition_ = louvain(s, tasks, self.resolution, self.seed)
        elif self.method == "greedy_modularity":
            self.partition_ = greedy_modularity(s, tasks, self.resolution)
        elif self.method == "kernighan_lin":
            self.partition_ = kernighan_lin(s, tasks, self.seed)
        elif self.method == "spectral":
            self.partition_ = spectral(s, tasks, int(self.n_groups), self.seed)
        else:
            self.partition_ = agglomerative(s, tasks, int(self.n_groups))
        self.groups_ = self.partition_.groups
        return self


def propose_partitions(
    matrix: np.ndarray,
    tasks: Sequence[str],
    n_groups: Sequence[int] = (2, 3, 4, 5, 6),
    resolutions: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
    seed: int = 0,
) -> list[Partition]:
    """Every method's partitions (Louvain and greedy modularity over ``resolutions``, spectral
    and agglomerative over ``n_groups``, Kernighan-Lin once), duplicates removed."""
    found: dict[tuple[str, tuple], Partition] = {}
    runs = [GraphPartitioner("louvain", resolution=r, seed=seed) for r in resolutions]
    runs += [GraphPartitioner("greedy_modularity", resolution=r) for r in resolutions]
    runs += [GraphPartitioner("kernighan_lin", seed=seed)]
    runs += [
        GraphPartitioner(m, n_groups=k, seed=seed)
        for m in ("spectral", "agglomerative")
        for k in n_groups
        if k < len(tasks)
    ]
    for run in runs:
        p = run.fit(matrix, tasks).partition_
        found.setdefault((p.method, p.groups), p)
    return list(found.values())
