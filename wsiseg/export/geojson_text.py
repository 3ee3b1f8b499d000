"""Polygon coordinates as GeoJSON text, formatted in numpy exactly as json.dumps writes shapely's `mapping`."""

from __future__ import annotations

import numpy as np

from wsiseg.errors import WsisegError

COORDINATE_DECIMALS = 3  # one group of DIGIT_GROUPS, as number_bytes writes them
DIGIT_GROUPS = np.array([list(f"{group:03d}".encode()) for group in range(1000)], np.uint8)  # ASCII
FRACTION_KEEP = np.array([[True, group % 100 != 0, group % 10 != 0] for group in range(1000)])


def number_bytes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(chars, keep): each value's `repr` (what json writes) as a row of ASCII bytes, and which of them to keep.

    The values must be rounded to COORDINATE_DECIMALS (3) already: such a float is the double
    nearest k / 1000, whose shortest repr is that decimal with its fraction's trailing zeros
    dropped (one digit kept), in fixed notation from 10^-4 up to 10^16; exact below 10^12.
    """
    whole, fraction = np.divmod(np.rint(np.abs(values) * 1000.0).astype(np.int64), 1000)
    largest = int(whole.max(initial=0))
    if largest >= 10**12:
        raise WsisegError(f"coordinate {largest} is beyond what a slide holds: check the mask's origin and MPP")
    groups = -(-len(str(largest)) // 3)  # of three integer digits
    digits = DIGIT_GROUPS[np.stack([whole // 1000**k % 1000 for k in range(groups - 1, -1, -1)] + [fraction], 1)]
    width = 3 * groups
    chars = np.empty((len(values), width + 5), np.uint8)
    chars[:, 0], chars[:, width + 1] = ord("-"), ord(".")
    chars[:, 1 : width + 1], chars[:, width + 2 :] = digits[:, :-1].reshape(len(values), width), digits[:, -1]
    keep = np.empty(chars.shape, bool)
    keep[:, 0] = np.signbit(values)
    lengths = np.searchsorted(10 ** np.arange(1, width), whole, side="right") + 1  # of the integer part
    keep[:, 1 : width + 1] = np.arange(width) >= width - lengths[:, None]  # no leading zeros
    keep[:, width + 1] = True
    keep[:, width + 2 :] = FRACTION_KEEP[fraction]  # no trailing zeros after the first decimal
    return chars, keep


def constant_bytes(text: bytes, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(chars, keep) of `count` rows of `text`, all kept (see `number_bytes`)."""
    return np.broadcast_to(np.frombuffer(text, np.uint8), (count, len(text))), np.ones((count, len(text)), bool)


def coordinate_texts(polygons: np.ndarray) -> list[str]:
    """Each polygon's GeoJSON coordinates as json.dumps writes shapely's `mapping` of it (rings of [x, y], exterior first)."""
    import shapely

    rings, owner = shapely.get_rings(polygons, return_index=True)
    points = shapely.get_coordinates(rings)
    parts = [constant_bytes(b"[", len(points)), number_bytes(points[:, 0]), constant_bytes(b", ", len(points)),
             number_bytes(points[:, 1]), constant_bytes(b"], ", len(points))]  # a row per vertex: "[x, y], "
    rows = np.concatenate([chars for chars, _ in parts], axis=1)
    keep = np.concatenate([kept for _, kept in parts], axis=1)
    text = rows[keep].tobytes().decode("ascii")
    vertex_ends = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
    ring_ends = np.cumsum(shapely.get_num_coordinates(rings))
    bounds = vertex_ends[np.concatenate([[0], ring_ends])].tolist()
    nested: list[list[str]] = [[] for _ in polygons]
    for polygon, begin, end in zip(owner.tolist(), bounds, bounds[1:]):
        nested[polygon].append(f"[{text[begin : end - 2]}]")
    return [f"[{', '.join(polygon)}]" for polygon in nested]
