"""Integer window grids: positions, clamping, overlap and tissue selection."""

from __future__ import annotations

import numpy as np
import pytest

from wsiseg.errors import WsisegError
from wsiseg.slide.grid import Grid
from wsiseg.slide.tissue import TissueMask


def test_positions_step_by_stride_and_clamp_the_last():
    grid = Grid(1000, 600, 256, 256)
    assert grid.xs == [0, 256, 512, 744]
    assert grid.ys == [0, 256, 344]
    assert grid.shape == (3, 4) and len(grid) == 12
    assert grid.positions()[:5] == [(0, 0), (256, 0), (512, 0), (744, 0), (0, 256)]
    assert all(x + 256 <= 1000 and y + 256 <= 600 for x, y in grid.positions())


def test_exact_fit_has_no_duplicate_and_small_image_one_window():
    assert Grid(768, 512, 256, 256).xs == [0, 256, 512]
    assert Grid(100, 80, 256, 128).positions() == [(0, 0)]


def test_unclamped_grid_is_the_chunk_grid():
    grid = Grid(1000, 600, 256, 256, clamp=False)
    assert grid.xs == [0, 256, 512, 768]
    assert grid.size(768, 512) == (232, 88)


def test_from_overlap():
    grid = Grid.from_overlap(1000, 1000, 224, 0.25)
    assert grid.stride == 224 - 56
    assert grid.xs[:3] == [0, 168, 336] and grid.xs[-1] == 1000 - 224
    with pytest.raises(WsisegError):
        Grid.from_overlap(1000, 1000, 224, 1.0)
    with pytest.raises(WsisegError):
        Grid(0, 10, 4, 4)


def test_tissue_positions_follow_the_mask_at_any_mpp():
    mask = np.zeros((100, 100), bool)
    mask[60:70, 10:20] = True  # tissue at 4 um/px: x 40..80 um, y 240..280 um
    tissue = TissueMask(mask, 4.0)
    grid = Grid(800, 800, 100, 100, clamp=False)  # image at 0.5 um/px: 400 um wide
    selected = grid.tissue_positions(tissue, 0.5)
    # tissue spans x 80..160 px and y 480..560 px of the image at 0.5 um/px
    assert selected == [(0, 400), (100, 400), (0, 500), (100, 500)]
    assert tissue.covers(80, 480, 1, 1, 0.5) and not tissue.covers(200, 480, 50, 50, 0.5)
