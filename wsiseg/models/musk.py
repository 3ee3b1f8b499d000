"""MUSK's vision tower: the image path of a BEiT-3 multiway transformer, written from the published architecture.

MUSK (a pathology vision-language model) is a BEiT-3 encoder: every layer holds a vision expert
and a language expert (the "multiway" split); an image passes through the vision experts only,
so this module holds those alone. A layer is pre-LN with sub-LN ("Magneto"): a LayerNorm on the
attention output before its out projection and one on the MLP's hidden activations before fc2.
Patch tokens follow one class token; absolute positions are a table whose rows 0 and 1 are never
used by images (fairseq starts positions at 2), and the output passes a final LayerNorm.

The published checkpoint holds `beit3.` over torchscale's BEiT3 names, e.g.
`beit3.encoder.layers.N.self_attn.q_proj.A.weight` (A = vision expert, B = language expert),
besides the text embedding and the retrieval heads. `remap_published` keeps the vision expert,
renames it onto this module and refuses any other layout.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsiseg.errors import WsisegError
from wsiseg.progress import get_logger

log = get_logger("models.musk")

PUBLISHED_MARK = "encoder.layers.0.self_attn.q_proj.A.weight"
LAYER_NORM_EPS = 1e-5
POSITION_OFFSET = 2  # fairseq's positions start at 2: rows 0 and 1 of the table are never used by images


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected by a strided convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D, H/p, W/p)."""
        height, width = x.shape[-2:]
        p = self.patch_size[0]
        if height % p or width % p:
            raise WsisegError(f"MUSK input {height}x{width} is not a multiple of its patch size {p}: "
                              f"use e.g. {max(p, height // p * p)}x{max(p, width // p * p)}")
        return self.proj(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a sub-LN on the attended values before the out projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.inner_attn_ln = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, self.num_heads, dim // self.num_heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(self.inner_attn_ln(attended.transpose(1, 2).reshape(batch, tokens, dim)))


class FeedForward(nn.Module):
    """fc1, GELU, a sub-LN on the hidden activations, fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """One encoder layer's vision expert: pre-LN attention and MLP, each with its residual."""

    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.self_attn = SelfAttention(dim, num_heads)
        self.final_layer_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ffn = FeedForward(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.ffn(self.final_layer_norm(x))


class MuskVision(nn.Module):
    """MUSK's image encoder: (B, 3, H, W) normalised RGB -> tokens, with the interface wsiseg reads from a timm ViT.

    Native input is `img_size` (384 for MUSK, a 24x24 grid). Other multiples of the patch size
    resample the position grid by plain bicubic, as MUSK's own loader does for other sizes.
    """

    num_prefix_tokens = 1

    def __init__(self, img_size: int = 384, patch_size: int = 16, embed_dim: int = 1024, depth: int = 24,
                 num_heads: int = 16, mlp_ratio: float = 4.0, in_chans: int = 3) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, int(embed_dim * mlp_ratio)) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table for a (h, w) patch grid, class position first."""
        if grid == self.patch_embed.grid_size:
            return self.pos_embed
        native = self.patch_embed.grid_size
        table = self.pos_embed[:, 1:].reshape(1, *native, -1).permute(0, 3, 1, 2)
        resampled = F.interpolate(table.float(), size=grid, mode="bicubic", align_corners=False).to(table.dtype)
        return torch.cat([self.pos_embed[:, :1], resampled.flatten(2).transpose(1, 2)], dim=1)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Class token and patch tokens with their positions, and the patch grid."""
        patches = self.patch_embed(x)
        grid = (patches.shape[-2], patches.shape[-1])
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        return tokens + self.positions(grid), grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens (class first) after the last block and the final norm."""
        tokens, _ = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False) -> Any:
        """Outputs of the blocks in `indices` (the last n blocks for an int), prefix dropped, as timm's ViTs give them.

        `norm` applies the final norm to each; `output_fmt` is "NCHW" (maps) or "NLC" (token rows).
        Unless `intermediates_only`, returns (final tokens after the norm, intermediates).
        """
        depth = len(self.blocks)
        if indices is None:
            wanted = set(range(depth))
        elif isinstance(indices, int):
            wanted = set(range(depth - indices, depth))
        else:
            wanted = {i % depth for i in indices}
        tokens, grid = self.embed(x)
        intermediates = []
        last = max(wanted) if intermediates_only else depth - 1  # blocks past the last wanted one need not run
        for index, block in enumerate(self.blocks[: last + 1]):
            tokens = block(tokens)
            if index in wanted:
                out = (self.norm(tokens) if norm else tokens)[:, self.num_prefix_tokens:]
                if output_fmt == "NCHW":
                    out = out.transpose(1, 2).reshape(x.shape[0], -1, *grid)
                intermediates.append(out)
        if intermediates_only:
            return intermediates
        return self.norm(tokens), intermediates


def is_published_layout(state: dict[str, Any]) -> bool:
    """Whether the keys are MUSK's published layout (torchscale BEiT3 names, with or without `beit3.`)."""
    return any(k == PUBLISHED_MARK or k == "beit3." + PUBLISHED_MARK for k in state)


def remap_published(state: dict[str, Any], source: str) -> dict[str, Any]:
    """MUSK's published keys -> this module's: the vision expert (`.A.`) kept, everything of text ignored.

    `beit3.encoder.layers.N.<part>.A.<leaf>` becomes `blocks.N.<part>.<leaf>`; the patch projection,
    class token, final norm and position table (rows from 2 on) are renamed alike. The language
    expert (`.B.`), text embedding, mask token and the retrieval heads are dropped; any other key
    is left as it is, for the strict load to report.
    """
    if not is_published_layout(state):
        shown = ", ".join(list(state)[:4])
        raise WsisegError(f"{source} is not a MUSK checkpoint: expected its published layout "
                          f"(beit3.{PUBLISHED_MARK}, ...), found keys {shown}; "
                          "download musk.pth or model.safetensors of MUSK, or choose the model the file belongs to")
    if any(k.startswith("beit3.") for k in state):
        beit3 = {k.removeprefix("beit3."): v for k, v in state.items() if k.startswith("beit3.")}
        dropped = [k for k in state if not k.startswith("beit3.")]
    else:
        beit3, dropped = state, []
    out: dict[str, Any] = {}
    layer = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.A\.(.+)$")
    for key, value in beit3.items():
        if key == "encoder.embed_positions.A.weight":
            out["pos_embed"] = value[POSITION_OFFSET:].unsqueeze(0)
        elif key.startswith("vision_embed.proj."):
            out["patch_embed." + key.removeprefix("vision_embed.")] = value
        elif key == "vision_embed.cls_token":
            out["cls_token"] = value
        elif key.startswith("encoder.layer_norm.A."):
            out["norm." + key.removeprefix("encoder.layer_norm.A.")] = value
        elif (match := layer.match(key)) is not None:
            out[f"blocks.{match[1]}.{match[2]}.{match[3]}"] = value
        elif ".B." in key or key in ("text_embed.weight", "vision_embed.mask_token"):
            dropped.append(key)
        else:
            out[key] = value
    log.info("MUSK: kept the vision expert (%d tensors); ignored %d of text and heads", len(out), len(dropped))
    return out

