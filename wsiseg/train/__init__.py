"""Supervised training and patch-level inference in the reference JSON/YAML formats."""
