"""Viewer exports of masks and images."""
