"""The engine's named choices: how a slide or image is predicted, and how overlapping windows are weighted."""

from __future__ import annotations

from wsiseg.choices import Choices

PREDICTION_MODES = Choices("mode", {
    "windowslide": "wsiseg.engine.windows:predict_windows",
    "resize": "wsiseg.engine.regions:predict_regions",
})
BLENDS = Choices("blend", {
    "gaussian": "wsiseg.engine.blend:gaussian_weights",
    "constant": "wsiseg.engine.blend:constant_weights",
})
