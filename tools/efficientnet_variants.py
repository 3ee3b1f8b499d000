"""Which timm architecture fits the EfficientNet-Lite0 ImageNet weights: classify skimage's chelsea with both.

The state dict maps one-to-one (in order and by shape) onto timm's `tf_efficientnet_lite0`
(TensorFlow "same" padding) and `efficientnet_lite0` (symmetric padding); the faithful one gives
the more confident correct answer. wsiseg registers the weights as `efficientnet_lite0_imagenet`
on `tf_efficientnet_lite0`.

    .venv/bin/python tools/efficientnet_variants.py
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from skimage.data import chelsea

from wsiseg.models.weights import read_state_dict, remap_in_order, strip_prefixes, unwrap
from wsiseg.samples import fetch_samples

EGYPTIAN_CAT = 285


def main() -> None:
    path = fetch_samples()["efficientnet_lite0_pth"]
    state = strip_prefixes(unwrap(read_state_dict(path)))
    image = torch.from_numpy(chelsea()).permute(2, 0, 1).float()[None] / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    x = (image - 0.5) / 0.5
    for architecture in ("tf_efficientnet_lite0", "efficientnet_lite0"):
        model = timm.create_model(architecture, pretrained=False).eval()
        model.load_state_dict(remap_in_order(state, model.state_dict(), str(path)), strict=True)
        with torch.no_grad():
            probabilities = model(x).softmax(-1)[0]
        top = probabilities.topk(3)
        print(f"{architecture:22s} p(Egyptian cat, 285) = {probabilities[EGYPTIAN_CAT]:.3f}; "
              f"top-3 {top.indices.tolist()} {[round(v, 3) for v in top.values.tolist()]}")


if __name__ == "__main__":
    main()
