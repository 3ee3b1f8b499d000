"""Training augmentations applied jointly to an image (3, H, W) float [0, 1] and its mask (H, W) int64.

Chosen by name with a probability each (`training.augmentations` in the YAML). Geometric ones
move image and mask together (masks by nearest neighbour; pixels brought in from outside the
image get the ignore index); photometric ones touch the image only. All randomness comes from
torch's generator, so a seeded run (and each DataLoader worker) is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Pair = tuple[torch.Tensor, torch.Tensor]


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _randint(low: int, high: int) -> int:
    """An integer in [low, high] inclusive."""
    return int(torch.randint(low, high + 1, ()))


def random_resized_crop(image: torch.Tensor, mask: torch.Tensor, size: int, ignore_index: int,
                        scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Pair:
    """Crop a random area (fraction `scale` of the image, aspect `ratio`) and resize it to size x size."""
    _, height, width = image.shape
    area = height * width
    for _ in range(10):
        target = area * _uniform(*scale)
        aspect = math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            break
    else:
        h, w = height, width
    y, x = _randint(0, height - h), _randint(0, width - w)
    image = image[:, y : y + h, x : x + w]
    mask = mask[y : y + h, x : x + w]
    image = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    mask = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0].long()
    return image.clamp_(0, 1), mask


def random_crop(image: torch.Tensor, mask: torch.Tensor, size: int, ignore_index: int) -> Pair:
    """A size x size crop at a random place; smaller images are padded (white image, ignored mask)."""
    _, height, width = image.shape
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=1.0)
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=ignore_index)
        height, width = height + pad_h, width + pad_w
    y, x = _randint(0, height - size), _randint(0, width - size)
    return image[:, y : y + size, x : x + size], mask[y : y + size, x : x + size]


def _warp(image: torch.Tensor, mask: torch.Tensor, grid: torch.Tensor, ignore_index: int) -> Pair:
    """Resample image (bilinear, border) and mask (nearest; outside -> ignore) at grid (H, W, 2) in [-1, 1]."""
    image = F.grid_sample(image[None], grid[None], mode="bilinear", padding_mode="border", align_corners=False)[0]
    shifted = (mask + 1).float()[None, None]
    sampled = F.grid_sample(shifted, grid[None], mode="nearest", padding_mode="zeros", align_corners=False)[0, 0]
    sampled = sampled.long() - 1
    sampled[sampled < 0] = ignore_index
    return image.clamp_(0, 1), sampled


def _identity_grid(height: int, width: int) -> torch.Tensor:
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width * 2 - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)


def elastic(image: torch.Tensor, mask: torch.Tensor, ignore_index: int, alpha: float = 0.04, sigma: float = 0.06) -> Pair:
    """Smooth random displacement field (alpha: strength, sigma: smoothness, both as fractions of the side)."""
    _, height, width = image.shape
    coarse = max(2, int(round(1 / sigma)))
    field = (torch.rand(1, 2, coarse, coarse) * 2 - 1) * alpha * 2
    field = F.interpolate(field, size=(height, width), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    return _warp(image, mask, _identity_grid(height, width) + field, ignore_index)


def grid_distortion(image: torch.Tensor, mask: torch.Tensor, ignore_index: int, steps: int = 5, limit: float = 0.3) -> Pair:
    """Stretch or squeeze the cells of a steps x steps grid by up to `limit` of their size, piecewise linearly."""
    _, height, width = image.shape

    def axis(n: int) -> torch.Tensor:
        cells = 1 + (torch.rand(steps) * 2 - 1) * limit
        edges = torch.cat([torch.zeros(1), torch.cumsum(cells, 0)]) / cells.sum() * 2 - 1
        uniform = torch.linspace(-1, 1, steps + 1)
        positions = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1
        index = torch.clamp(torch.searchsorted(uniform, positions) - 1, 0, steps - 1)
        t = (positions - uniform[index]) / (uniform[index + 1] - uniform[index])
        return edges[index] + t * (edges[index + 1] - edges[index])

    grid_y, grid_x = torch.meshgrid(axis(height), axis(width), indexing="ij")
    return _warp(image, mask, torch.stack([grid_x, grid_y], dim=-1), ignore_index)


def optical_distortion(image: torch.Tensor, mask: torch.Tensor, ignore_index: int, limit: float = 0.15) -> Pair:
    """Barrel or pincushion (radial) lens distortion around a slightly shifted centre."""
    _, height, width = image.shape
    grid = _identity_grid(height, width)
    k = _uniform(-limit, limit)
    centre = torch.tensor([_uniform(-0.1, 0.1), _uniform(-0.1, 0.1)])
    offset = grid - centre
    radius2 = (offset**2).sum(-1, keepdim=True)
    return _warp(image, mask, centre + offset * (1 + k * radius2), ignore_index)


def _rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    r, g, b = image
    value, _ = image.max(0)
    minimum, _ = image.min(0)
    delta = value - minimum
    saturation = torch.where(value > 0, delta / value.clamp_min(1e-8), torch.zeros_like(value))
    safe = delta.clamp_min(1e-8)
    hue = torch.where(value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = hsv
    k = lambda n: (n + hue * 6) % 6  # noqa: E731
    channel = lambda n: value - value * saturation * torch.clamp(torch.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return torch.stack([channel(5), channel(3), channel(1)])


def hsv_shift(image: torch.Tensor, hue: float = 0.03, saturation: float = 0.15, value: float = 0.1) -> torch.Tensor:
    """Shift hue (fraction of the circle), saturation and value by random amounts."""
    hsv = _rgb_to_hsv(image)
    hsv[0] = (hsv[0] + _uniform(-hue, hue)) % 1.0
    hsv[1] = (hsv[1] + _uniform(-saturation, saturation)).clamp(0, 1)
    hsv[2] = (hsv[2] + _uniform(-value, value)).clamp(0, 1)
    return _hsv_to_rgb(hsv)


def color_jitter(image: torch.Tensor, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
                 hue: float = 0.03) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter in a random order."""
    grey = lambda x: (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]  # noqa: E731
    operations = [
        lambda x: x * _uniform(1 - brightness, 1 + brightness),
        lambda x: (x - grey(x).mean()) * _uniform(1 - contrast, 1 + contrast) + grey(x).mean(),
        lambda x: (x - grey(x)) * _uniform(1 - saturation, 1 + saturation) + grey(x),
        lambda x: hsv_shift(x.clamp(0, 1), hue, 0.0, 0.0),
    ]
    for index in torch.randperm(len(operations)).tolist():
        image = operations[index](image).clamp(0, 1)
    return image


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(image: torch.Tensor, sigma_range: tuple[float, float] = (0.3, 1.5)) -> torch.Tensor:
    """Separable Gaussian blur with a random sigma (pixels)."""
    kernel = _gaussian_kernel(_uniform(*sigma_range))
    pad = len(kernel) // 2
    out = F.conv2d(F.pad(image[:, None], (pad, pad, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, pad, pad), mode="replicate"), kernel.view(1, 1, -1, 1))
    return out[:, 0]


def motion_blur(image: torch.Tensor, max_length: int = 7) -> torch.Tensor:
    """Blur along a line of random length and direction."""
    length = _randint(3, max_length) | 1
    kernel = torch.zeros(length, length)
    angle = _uniform(0, math.pi)
    centre = length // 2
    for t in torch.linspace(-centre, centre, 4 * length):
        kernel[int(round(centre + float(t) * math.sin(angle))), int(round(centre + float(t) * math.cos(angle)))] = 1
    kernel /= kernel.sum()
    padded = F.pad(image[:, None], (centre,) * 4, mode="replicate")
    return F.conv2d(padded, kernel[None, None])[:, 0]


def median_blur(image: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Median filter of a size x size neighbourhood."""
    pad = size // 2
    padded = F.pad(image[None], (pad,) * 4, mode="replicate")
    patches = F.unfold(padded, size)  # (1, 3*size*size, H*W)
    _, height, width = image.shape
    return patches.view(3, size * size, height * width).median(dim=1).values.view(3, height, width)


def coarse_dropout(image: torch.Tensor, max_holes: int = 8, max_fraction: float = 0.1) -> torch.Tensor:
    """Fill a few random rectangles (up to `max_fraction` of each side) with a random grey."""
    _, height, width = image.shape
    image = image.clone()
    for _ in range(_randint(1, max_holes)):
        h = _randint(1, max(1, int(height * max_fraction)))
        w = _randint(1, max(1, int(width * max_fraction)))
        y, x = _randint(0, height - h), _randint(0, width - w)
        image[:, y : y + h, x : x + w] = _uniform(0, 1)
    return image


PHOTOMETRIC: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "color_jitter": color_jitter,
    "hsv": hsv_shift,
    "rgb_shift": lambda x: x + (torch.rand(3, 1, 1) * 2 - 1) * 0.06,
    "brightness_contrast": lambda x: (x - 0.5) * _uniform(0.8, 1.2) + 0.5 + _uniform(-0.1, 0.1),
    "gamma": lambda x: x.clamp(0, 1) ** _uniform(0.8, 1.25),
    "gaussian_noise": lambda x: x + torch.randn_like(x) * _uniform(0.01, 0.05),
    "multiplicative_noise": lambda x: x * (1 + (torch.rand_like(x[:1]) * 2 - 1) * 0.1),
    "gaussian_blur": gaussian_blur,
    "motion_blur": motion_blur,
    "median_blur": median_blur,
    "coarse_dropout": coarse_dropout,
}
WARPS = {"elastic": elastic, "grid_distortion": grid_distortion, "optical_distortion": optical_distortion}


class TrainTransform:
    """Crop to `crop_size` (random resized crop or plain random crop), then the named augmentations."""

    def __init__(self, crop_size: int, augmentations: dict[str, float], ignore_index: int = 255) -> None:
        self.crop_size = crop_size
        self.augmentations = dict(augmentations)
        self.ignore_index = ignore_index

    def _happens(self, name: str) -> bool:
        probability = self.augmentations.get(name, 0.0)
        return probability > 0 and float(torch.rand(())) < probability

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Pair:
        short = min(image.shape[1:])
        if self._happens("random_resized_crop") and short >= self.crop_size // 2:
            image, mask = random_resized_crop(image, mask, self.crop_size, self.ignore_index)
        else:
            image, mask = random_crop(image, mask, self.crop_size, self.ignore_index)
        if self._happens("hflip"):
            image, mask = image.flip(-1), mask.flip(-1)
        if self._happens("vflip"):
            image, mask = image.flip(-2), mask.flip(-2)
        if self._happens("rotate90"):
            turns = _randint(1, 3)
            image, mask = torch.rot90(image, turns, (1, 2)), torch.rot90(mask, turns, (0, 1))
        if self._happens("transpose"):
            image, mask = image.transpose(1, 2), mask.transpose(0, 1)
        for name, warp in WARPS.items():
            if self._happens(name):
                image, mask = warp(image, mask, self.ignore_index)
        for name, operation in PHOTOMETRIC.items():
            if self._happens(name):
                image = operation(image).clamp(0, 1)
        return image.contiguous(), mask.contiguous()
