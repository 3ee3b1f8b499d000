"""The model's named choices, registered once and torch-free (config validation and the CLI read them)."""

from __future__ import annotations

from wsiseg.choices import Choices

DECODERS = Choices("model.decoder", {
    "fused": "wsiseg.models.decoders:FusedDecoder",
    "progressive": "wsiseg.models.decoders:ProgressiveDecoder",
})

# mode -> how it sets up the backbone: fn(backbone, rank, alpha, dropout, targets) -> the backbone to train
FINETUNE_MODES = Choices("model.finetune_mode", {
    "lora": "wsiseg.models.finetune:add_lora",
    "dora": "wsiseg.models.finetune:add_dora",
    "full": "wsiseg.models.finetune:train_all",
    "frozen": "wsiseg.models.finetune:freeze",
})
