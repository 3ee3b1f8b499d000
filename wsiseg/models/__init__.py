"""Backbones (pathology foundation models and timm models), decoders, fine-tuning and checkpoints.

Submodules import torch, timm and peft; nothing is imported here so that the command line
stays fast.
"""
