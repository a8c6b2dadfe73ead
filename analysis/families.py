"""Feature families from the co-occurrence graph (O'Neill et al. 2024, "Disentangling Dense
Embeddings with Sparse Autoencoders") [paper + adapt].

Graph: latents are nodes; edge weight = normalised co-occurrence C_ij / min(C_ii, C_jj) (the share of
the rarer latent's firings on which the other also fires). Edges lighter than `min_weight` are cut,
then we take the maximum spanning forest (Kruskal, union-find, numpy; no networkx; the cut is exact for
the kept edges since Kruskal decides every heavier edge first), root each tree at its most frequent
latent and orient edges away from the root, so a parent is on the path to the densest, most general
latent of its cluster [adapt: the paper orients by density; rooting keeps every node to one parent].
A family is a parent with at least `min_children` children: the parent (depth 0) and its children
(depth 1). Families nest: a child can root its own family. A family's id is its parent's latent id.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp


def cooc_row_blocks(cooc: Any, max_entries: int = 1 << 22) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, dense int64 block [rows, n]) of a dense or CSR co-occurrence matrix; a block holds at
    most `max_entries` cells, so nothing is ever [n, n]-sized beyond the counts themselves."""
    n = cooc.shape[0]
    step = max(1, max_entries // max(n, 1))
    for lo in range(0, n, step):
        blk = cooc[lo : lo + step]
        yield lo, (blk.toarray() if sp.issparse(blk) else np.asarray(blk))


def normalised_edges(
    cooc: Any, n_fires: np.ndarray, min_weight: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected edges (i < j, count > 0, weight >= min_weight) with weight C_ij / min(fires_i, fires_j),
    from dense or sparse counts, read in row blocks."""
    ii, jj, ww = [], [], []
    for lo, blk in cooc_row_blocks(cooc):
        r, c = np.nonzero(blk > 0)
        r = r + lo
        upper = c > r
        r, c = r[upper], c[upper]
        w = blk[r - lo, c] / np.maximum(np.minimum(n_fires[r], n_fires[c]), 1)
        keep = w >= min_weight
        ii.append(r[keep])
        jj.append(c[keep])
        ww.append(w[keep].astype(np.float64))
    if not ii:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(ii).astype(np.int64), np.concatenate(jj).astype(np.int64), np.concatenate(ww)


def maximum_spanning_tree(n: int, i: np.ndarray, j: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """Kruskal: the edges (i, j, w) of a maximum spanning forest of an n-node graph.

    Ties are broken by edge order (stable sort), so the result is deterministic.
    """
    parent = np.arange(n)

    def find(a: int) -> int:
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:  # path compression
            parent[a], a = root, parent[a]
        return root

    order = np.argsort(-w, kind="stable")
    keep: list[int] = []
    for e in order.tolist():
        ra, rb = find(int(i[e])), find(int(j[e]))
        if ra != rb:
            parent[ra] = rb
            keep.append(e)
            if len(keep) == n - 1:
                break
    sel = np.asarray(keep, np.int64)
    return i[sel], j[sel], w[sel]


def root_forest(
    n: int, i: np.ndarray, j: np.ndarray, w: np.ndarray, n_fires: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(parent [n], weight to parent [n]) of the forest, each tree rooted at its most frequent node."""
    adj: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    for a, b, x in zip(i.tolist(), j.tolist(), w.tolist(), strict=True):
        adj[a].append((b, x))
        adj[b].append((a, x))
    par = np.full(n, -1, np.int64)
    pw = np.zeros(n, np.float64)
    seen = np.zeros(n, bool)
    for start in np.argsort(-n_fires, kind="stable").tolist():  # densest first: it becomes the root
        if seen[start]:
            continue
        seen[start] = True
        queue = deque([start])
        while queue:
            u = queue.popleft()
            for v, x in adj[u]:
                if not seen[v]:
                    seen[v] = True
                    par[v], pw[v] = u, x
                    queue.append(v)
    return par, pw


def feature_families(
    cooc: Any, n_fires: np.ndarray, min_weight: float = 0.1, min_children: int = 2
) -> dict[str, np.ndarray]:
    """Families as flat arrays: family (= parent latent id), latent, parent (-1 for the root), depth, weight."""
    n = len(n_fires)
    # Edges under min_weight are dropped before Kruskal: exact for the kept edges, since Kruskal decides
    # every heavier edge before it looks at a lighter one; it bounds the edge list for large runs.
    i, j, w = normalised_edges(cooc, n_fires, min_weight)
    ti, tj, tw = maximum_spanning_tree(n, i, j, w)
    par, pw = root_forest(n, ti, tj, tw, n_fires)
    strong = par >= 0
    counts = np.bincount(par[strong], minlength=n)
    roots = np.flatnonzero(counts >= min_children)
    fam, lat, parent, depth, weight = [], [], [], [], []
    child_mask = strong & np.isin(par, roots)
    kids = np.flatnonzero(child_mask)
    fam += [roots, par[kids]]
    lat += [roots, kids]
    parent += [np.full(len(roots), -1), par[kids]]
    depth += [np.zeros(len(roots), np.int64), np.ones(len(kids), np.int64)]
    weight += [np.full(len(roots), np.nan), pw[kids]]
    f = np.concatenate(fam).astype(np.int64)
    order = np.lexsort((np.concatenate(lat), np.concatenate(depth), f))
    return {
        "family": f[order],
        "latent": np.concatenate(lat).astype(np.int64)[order],
        "parent": np.concatenate(parent).astype(np.int64)[order],
        "depth": np.concatenate(depth).astype(np.int64)[order],
        "weight": np.concatenate(weight)[order],
    }
