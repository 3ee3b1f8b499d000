"""Reader threads against reader processes on the real CMU sample: windows/s of the window loader.

Threads: `wsiseg.engine.loader.iterate_batches` (the loader `segment` and `fseg` use). Processes:
a torch DataLoader with the same windows, batches and prefetch depth, each process reopening the
slide (the loader wsiseg had before it moved to threads). Both read the same windows of the
CMU slide (tiled over --passes copies of its window grid) to CPU tensors; the two alternate and
the best of --repeats runs counts (the machine may be shared).

Then the same for `tile_slide` of the slide at its own MPP (--tile px tiles, read, compressed,
written): writer threads of this process against a dask LocalCluster of as many worker
processes (its start-up not counted).

    .venv/bin/python tools/infra_readers.py --readers 1 2 --mpp 0.499 0.5
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np

from wsiseg.engine.loader import PREFETCH_BATCHES, iterate_batches, partition
from wsiseg.samples import fetch_samples
from wsiseg.slide import open_slide
from wsiseg.slide.grid import Grid


class Windows:
    """The windows as a map-style dataset for torch's DataLoader (process readers)."""

    def __init__(self, slide, positions, window, mpp):
        self.slide, self.positions, self.window, self.mpp = slide, positions, window, mpp

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, index):
        import torch

        x, y = self.positions[index]
        return torch.from_numpy(np.require(self.slide.read(x, y, self.window, self.window, self.mpp), np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]))


def _reopen(worker_id):
    import torch

    dataset = torch.utils.data.get_worker_info().dataset
    dataset.slide = pickle.loads(pickle.dumps(dataset.slide))


def run_processes(slide, positions, window, mpp, batch, readers):
    import torch

    loader = torch.utils.data.DataLoader(
        Windows(slide, positions, window, mpp), batch_sampler=partition(len(positions), batch),
        num_workers=readers, collate_fn=torch.stack, prefetch_factor=PREFETCH_BATCHES, worker_init_fn=_reopen,
    )
    started = time.perf_counter()
    for pixels in loader:
        pixels.permute(0, 3, 1, 2).float().div_(255.0)
    return len(positions) / (time.perf_counter() - started)


def run_threads(slide, positions, window, mpp, batch, readers):
    started = time.perf_counter()
    for _ in iterate_batches(slide, positions, window, mpp, batch, readers, "cpu"):
        pass
    return len(positions) / (time.perf_counter() - started)


def tile_rates(path, readers, tile, repeats):
    """Best tiles/s of tile_slide with `readers` threads and with `readers` LocalCluster processes."""
    from wsiseg.driver import dask_client
    from wsiseg.store.tiling import tile_slide

    best = {"threads": 0.0, "processes": 0.0}
    with tempfile.TemporaryDirectory() as tmp, dask_client(None, local_workers=readers) as client:
        out = Path(tmp) / "s.zarr"
        for _ in range(repeats):
            for name, options in (("threads", {"workers": readers}), ("processes", {"client": client})):
                started = time.perf_counter()
                store = tile_slide(path, out, open_slide(path).mpp, tile=tile, overwrite=True, progress=False,
                                   **options)
                rate = len(store.tissue_tiles()) / (time.perf_counter() - started)
                best[name] = max(best[name], rate)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--mpp", type=float, nargs="+", default=[0.499, 0.5], help="0.499 is the slide's own")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--passes", type=int, default=8, help="copies of the window grid read per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile", type=int, default=256, help="tile side of the tile_slide comparison")
    args = parser.parse_args()

    slide = open_slide(fetch_samples()["cmu_svs"])
    print(f"{slide.path.name}: {slide.level_dimensions[0]}, {slide.mpp:g} MPP, {args.window} px windows")
    print(f"{'mpp':>6} {'readers':>7} {'threads/s':>10} {'processes/s':>12} {'ratio':>6}")
    for mpp in args.mpp:
        width, height = slide.size_at(mpp)
        grid = Grid(width, height, args.window, args.window)
        positions = [(x, y) for x, y in grid.positions()] * args.passes
        for readers in args.readers:
            best = {"threads": 0.0, "processes": 0.0}
            for _ in range(args.repeats):
                best["threads"] = max(best["threads"], run_threads(slide, positions, args.window, mpp, args.batch, readers))
                best["processes"] = max(best["processes"], run_processes(slide, positions, args.window, mpp, args.batch, readers))
            ratio = best["threads"] / best["processes"]
            print(f"{mpp:>6g} {readers:>7} {best['threads']:>10.1f} {best['processes']:>12.1f} {ratio:>6.2f}")
    print(f"\ntile_slide at {slide.mpp:g} MPP, {args.tile} px tiles (whole call, tiles/s)")
    print(f"{'writers':>7} {'threads/s':>10} {'processes/s':>12} {'ratio':>6}")
    for readers in args.readers:
        best = tile_rates(slide.path, readers, args.tile, args.repeats)
        ratio = best["threads"] / best["processes"]
        print(f"{readers:>7} {best['threads']:>10.1f} {best['processes']:>12.1f} {ratio:>6.2f}")


if __name__ == "__main__":
    main()
