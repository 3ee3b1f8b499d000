"""The model's named choices, registered once and torch-free (config validation and the CLI read them)."""

from __future__ import annotations

from wsiseg.choices import Choices

DECODERS = Choices("model.decoder", {
    "fused": "wsiseg.models.decoders:FusedDecoder",
    "progressive": "wsiseg.models.decoders:ProgressiveDecoder",
})
