"""Pixel-edge segments merged into lines between junctions, in numpy: the lines GEOS's line merger makes
of them, in its order, direction and start points (so polygonize sees what it saw through GEOS), without
building a linestring per segment."""

from __future__ import annotations

import numpy as np


def _merge_graph(start: np.ndarray, stop: np.ndarray, vertical: np.ndarray) -> tuple[np.ndarray, ...]:
    """The segments' directed edges (2e: start -> stop, 2e + 1: back) as GEOS's line merger sees them.

    Returns (key, out, from_node, nodes, span): each directed edge's order key (its from-node in
    GEOS's node order, x then y, then its slot in the node's star: +x, +y, -x, -y, counter-clockwise
    as GEOS sorts it), the (nodes, 4) table of out-edges by slot (-1: none), each directed edge's
    from-node, and the nodes' keys x * span + y.
    """
    span = int(stop[:, 1].max()) + 1
    ends = np.stack([start[:, 0] * span + start[:, 1], stop[:, 0] * span + stop[:, 1]], 1).reshape(-1)
    slots = (vertical.astype(np.int64)[:, None] + np.array([0, 2])).reshape(-1)
    nodes, from_node = np.unique(ends, return_inverse=True)
    out = np.full((len(nodes), 4), -1, np.int32)
    out[from_node, slots] = np.arange(len(ends))
    return ends * 4 + slots, out, from_node, nodes, span


def _walk_ranks(pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(head, rank, cyclic) of every directed edge along predecessor links (-1: none), by pointer jumping.

    `head` is the first edge of each one's walk, `rank` its steps from there; `cyclic` marks the
    edges on cycles (no head: their head and rank mean nothing). Each round settles some edge of
    every walk still unsettled, so a round that settles none leaves only cycles.
    """
    parent = np.where(pred >= 0, pred, np.arange(len(pred)))
    rank = (pred >= 0).astype(np.int64)  # the steps from each edge back to its parent
    active = np.flatnonzero(pred[parent] >= 0)  # those whose parent is not their walk's head
    while True:
        up = parent[active]
        rank[active] += rank[up]
        parent[active] = parent[up]
        unsettled = active[pred[parent[active]] >= 0]
        if len(unsettled) == len(active):
            break
        active = unsettled
    cyclic = np.zeros(len(pred), bool)
    cyclic[active] = True
    return parent, rank, cyclic


def _cycle_firsts(pred: np.ndarray, key: np.ndarray, cyclic: np.ndarray) -> np.ndarray:
    """The lowest-key edge on each `cyclic` edge's cycle (others: themselves), by windows doubling until none changes."""
    cycle = np.flatnonzero(cyclic)
    lowest, parent = np.arange(len(pred)), pred.copy()
    while True:
        candidate = lowest[parent[cycle]]
        better = key[candidate] < key[lowest[cycle]]
        if not better.any():
            return lowest
        lowest[cycle] = np.where(better, candidate, lowest[cycle])
        parent[cycle] = parent[parent[cycle]]


def _walks(key: np.ndarray, out: np.ndarray, from_node: np.ndarray) -> tuple[np.ndarray, ...]:
    """(walked, first, rank, loop) per segment: the walks GEOS's line merger takes through the directed edges.

    Lines run between nodes not of degree 2; each starts at its end first in the merger's node
    and star order. Isolated loops (all nodes of degree 2) start at their first node and its first
    out-edge. For each segment: the directed edge of it walked, the walk's first directed edge, its
    steps from there, and whether the walk is an isolated loop.
    """
    degree = (out >= 0).sum(axis=1, dtype=np.int8)
    pair = np.sort(out[degree == 2], axis=1)[:, 2:]  # the two out-edges of each node of degree 2
    pred = np.full(len(key), -1, np.int64)
    pred[pair[:, 0]], pred[pair[:, 1]] = pair[:, 1] ^ 1, pair[:, 0] ^ 1
    head, rank, cyclic = _walk_ranks(pred)
    first = np.where(cyclic, _cycle_firsts(pred, key, cyclic), head)  # of the walk each directed edge is on
    walked = np.arange(0, len(key), 2) + (key[first[1::2]] < key[first[0::2]])  # the direction that starts first
    loop = cyclic[walked]
    cut = np.full(len(key), -1, np.int64)  # the loops' walks, cut at their first edges
    cut[walked[loop]] = pred[walked[loop]]
    cut[first[walked[loop]]] = -1
    return walked, first[walked], np.where(loop, _walk_ranks(cut)[1][walked], rank[walked]), loop


def merged_lines(start: np.ndarray, stop: np.ndarray, vertical: np.ndarray) -> np.ndarray:
    """The segments merged into lines between junctions: the same lines, in the same order, as GEOS's line merger.

    Lines with more reversed than forward segments are reversed, as the merger does.
    """
    import shapely

    key, out, from_node, nodes, span = _merge_graph(start, stop, vertical)
    walked, first, rank, loop = _walks(key, out, from_node)
    order = np.lexsort((rank, key[first], loop))  # lines from junctions first, each in the merger's order
    walked, first, rank = walked[order], first[order], rank[order]
    begins = np.concatenate([[True], first[1:] != first[:-1]])
    line = np.cumsum(begins) - 1
    lengths = np.bincount(line)
    flip = 2 * np.bincount(line, weights=walked & 1) > lengths
    offsets = np.cumsum(lengths + 1) - lengths - 1
    points = np.empty(offsets[-1] + lengths[-1] + 1, np.int64)
    points[offsets[line] + np.where(flip[line], lengths[line] - rank - 1, rank + 1)] = nodes[from_node[walked ^ 1]]
    points[offsets + np.where(flip, lengths, 0)] = nodes[from_node[first[begins]]]
    coords = np.stack([points // span, points % span], axis=1).astype(np.float64)
    return shapely.linestrings(coords, indices=np.repeat(np.arange(len(lengths)), lengths + 1))
