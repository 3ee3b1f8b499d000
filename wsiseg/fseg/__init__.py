"""F-Seg: unsupervised segmentation by projecting token features onto a bank of concepts."""
