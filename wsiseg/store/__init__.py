"""Zarr stores: tile stores of slides (and, from the engine, mask stores)."""
