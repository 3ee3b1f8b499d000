"""Load backbone weights from local files: unwrap, strip prefixes, remap foreign layouts, load strictly.

The module is built on the meta device and the state dict is loaded with
`load_state_dict(assign=True)`, so a ViT-g loads in about the time it takes to read the file.
A checkpoint that does not fit raises a WsisegError listing missing and unexpected keys and
shape mismatches; there is no silent non-strict load.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from wsiseg.errors import WsisegError
from wsiseg.progress import get_logger

log = get_logger("models.weights")

WRAPPERS = ("teacher", "model", "state_dict")
PREFIXES = ("module.", "_orig_mod.")
TRUNKS = ("backbone.", "visual.trunk.")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
SHARD = re.compile(r".+-\d{5}-of-(\d{5})\.(safetensors|bin)$")


def resolve_weights_file(path: Path) -> Path:
    """The weights of `path`: the file itself, or the weights (or shard index) inside a Hugging Face model folder.

    One shard of a sharded checkpoint (`model-00001-of-00003.safetensors`) stands for the whole
    checkpoint: its index next to it is returned.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise WsisegError(f"weights not found: {path}; set model.pfm_weights_path to a local .bin/.pth/.safetensors file or model folder")
    if path.is_file():
        shard = SHARD.match(path.name)
        if shard is None:
            return path
        index = next((path.parent / n for n in INDEX_FILES if (path.parent / n).is_file()), None)
        if index is None:
            raise WsisegError(f"{path.name} is one shard of {int(shard[1])} and no {' or '.join(INDEX_FILES)} lies beside it; "
                              "put the index file (it comes with the shards) in the folder and point pfm_weights_path at the folder")
        log.info("%s is one shard of %d: loading every shard through %s", path.name, int(shard[1]), index.name)
        return index
    for name in WEIGHT_FILES + INDEX_FILES:
        if (path / name).is_file():
            return path / name
    candidates = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise WsisegError(f"no weights file (model.safetensors, pytorch_model.bin, *.pth, or a shard index) in folder {path}; "
                          "point pfm_weights_path at the weights file")
    if all(SHARD.match(p.name) for p in candidates):
        raise WsisegError(f"{path} holds the shards {candidates[0].name}... but not their index ({' or '.join(INDEX_FILES)}); "
                          "copy the index file that came with the shards into the folder")
    raise WsisegError(f"several weights files in {path} ({', '.join(p.name for p in candidates)}); point pfm_weights_path at one of them")


def read_sharded(index: Path) -> dict[str, Any]:
    """Read every shard named by a Hugging Face shard index (`weight_map`: tensor name -> shard file) into one dict."""
    import json

    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise WsisegError(f"{index} is not a shard index ({type(error).__name__}: {error}); "
                          "it should hold a weight_map from tensor names to shard files: download it again") from None
    missing = [name for name in shards if not (index.parent / name).is_file()]
    if missing:
        raise WsisegError(f"{index.name} names {len(shards)} shards but {len(missing)} are not in {index.parent} "
                          f"({', '.join(missing[:3])}); download the missing shards")
    state: dict[str, Any] = {}
    for name in shards:
        part = read_state_dict(index.parent / name)
        expected = {key for key, shard in weight_map.items() if shard == name}
        if not expected <= set(part):
            absent = sorted(expected - set(part))
            raise WsisegError(f"shard {name} lacks {len(absent)} tensors its index names ({', '.join(absent[:3])}); "
                              "the shard is incomplete: download it again")
        state.update(part)
    return state


def read_state_dict(path: Path) -> dict[str, Any]:
    """Read a .safetensors or torch-pickled file, or a shard index, into a dict (tensors only are trusted)."""
    import torch

    if path.name.endswith(".index.json"):
        return read_sharded(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to parse means a corrupt or foreign file
        raise WsisegError(f"cannot read weights {path}: {type(error).__name__}: {str(error).splitlines()[0][:200]}; "
                          "the file is corrupt or not a state dict: download it again") from None
    if not isinstance(loaded, dict):
        raise WsisegError(f"{path} holds a {type(loaded).__name__}, not a state dict; save model.state_dict() instead")
    return loaded


def unwrap(state: dict[str, Any]) -> dict[str, Any]:
    """Descend into `teacher` / `model` / `state_dict` wrappers until the tensors are reached."""
    import torch

    while not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in WRAPPERS if isinstance(state.get(k), dict)), None)
        if inner is None:
            raise WsisegError(f"no tensors found in the checkpoint (top-level keys: {', '.join(list(state)[:8])}); "
                              "expected a state dict, possibly under 'model', 'state_dict' or 'teacher'")
        state = inner
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Remove `module.` / `_orig_mod.` prefixes; keep only the vision trunk of a larger model.

    The trunk is the `backbone.` part (DINO-style training checkpoints) or the `visual.trunk.`
    part (open_clip models such as CONCH); other keys (heads, text tower) are ignored.
    """
    def clean(key: str) -> str:
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        return key

    state = {clean(k): v for k, v in state.items()}
    for trunk in TRUNKS:
        if any(k.startswith(trunk) for k in state):
            others = [k for k in state if not k.startswith(trunk)]
            if others:
                log.info("keeping the %s* keys of the checkpoint; ignoring %d others: %s", trunk, len(others),
                         ", ".join(others[:4]))
            return {k[len(trunk):]: v for k, v in state.items() if k.startswith(trunk)}
    return state


def is_hf_layout(state: dict[str, Any]) -> bool:
    """Whether the keys are those of a Hugging Face ViTModel / Dinov2Model."""
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state)


HF_BLOCK = {
    "attention.output.dense": "attn.proj",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "norm1": "norm1",
    "norm2": "norm2",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1",
    "mlp.weights_out": "mlp.fc2",
    "attention.o_proj": "attn.proj",
    "mlp.down_proj": "mlp.fc2",
}
HF_QKV = {"query": "query", "key": "key", "value": "value", "q_proj": "query", "k_proj": "key", "v_proj": "value"}
HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
HF_DROPPED = ("embeddings.mask_token", "pooler.dense.weight", "pooler.dense.bias")


def remap_hf(state: dict[str, Any], model: Any) -> dict[str, Any]:
    """Translate Hugging Face ViTModel / Dinov2Model keys to timm VisionTransformer keys.

    Both the files on the hub (`encoder.layer.N.attention.attention.query`) and the in-memory
    names of transformers 5 (`layers.N.attention.q_proj`) are understood.
    Query, key and value are concatenated into timm's fused qkv, SwiGLU gate and up
    projections into timm's packed fc1 (gate first, as timm's SwiGLUPacked expects). The pooler and the mask token
    are not part of the trunk and are dropped. For timm models without a class position
    (`no_embed_class`), the class position embedding is folded into the class token, which
    is exact since both are constants added to the same token.
    """
    import torch

    root = next(k for k in state if k.endswith("embeddings.patch_embeddings.projection.weight"))
    base = root[: -len("embeddings.patch_embeddings.projection.weight")]
    state = {k[len(base):]: v for k, v in state.items() if k.startswith(base)}
    out: dict[str, Any] = {}
    qkv: dict[tuple[int, str], dict[str, Any]] = {}
    glu: dict[tuple[int, str], dict[str, Any]] = {}
    pattern = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
    for key, value in state.items():
        if key in HF_DROPPED:
            continue
        if key in HF_TOP:
            out[HF_TOP[key]] = value
            continue
        match = pattern.match(key)
        if match is None:
            out[key] = value  # reported as unexpected by the strict load
            continue
        index, module, kind = int(match[1]), match[2], match[3]
        part = module.rsplit(".", 1)[-1]
        if module.startswith("attention.") and part in HF_QKV:
            qkv.setdefault((index, kind), {})[HF_QKV[part]] = value
        elif module in ("mlp.gate_proj", "mlp.up_proj"):
            glu.setdefault((index, kind), {})[part] = value
        elif kind == "lambda1":
            out[f"blocks.{index}.{HF_BLOCK[module + '.lambda1']}"] = value
        elif module in HF_BLOCK:
            out[f"blocks.{index}.{HF_BLOCK[module]}.{kind}"] = value
        else:
            out[key] = value
    for (index, kind), parts in qkv.items():
        if len(parts) != 3:
            raise WsisegError(f"layer {index} of the Hugging Face checkpoint lacks one of query/key/value {kind}; the file is incomplete")
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    for (index, kind), parts in glu.items():
        if len(parts) != 2:
            raise WsisegError(f"layer {index} of the Hugging Face checkpoint lacks gate_proj or up_proj {kind}; the file is incomplete")
        out[f"blocks.{index}.mlp.fc1.{kind}"] = torch.cat([parts["gate_proj"], parts["up_proj"]], dim=0)
    if "reg_token" in out and out["reg_token"].dim() == 2:
        out["reg_token"] = out["reg_token"].unsqueeze(0)
    if getattr(model, "no_embed_class", False) and "pos_embed" in out and "cls_token" in out:
        grid_tokens = model.pos_embed.shape[1]
        if out["pos_embed"].shape[1] == grid_tokens + 1:
            out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
            out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def remap_in_order(state: dict[str, Any], model_state: dict[str, Any], source: str) -> dict[str, Any]:
    """Map a state dict onto a module whose keys correspond one-to-one, in order and by shape."""
    source_items = list(state.items())
    target_items = list(model_state.items())
    if len(source_items) != len(target_items):
        raise WsisegError(f"{source} has {len(source_items)} tensors but the model expects {len(target_items)}; "
                          "it is a checkpoint of another architecture")
    out = {}
    for (skey, value), (tkey, expected) in zip(source_items, target_items):
        if tuple(value.shape) != tuple(expected.shape):
            raise WsisegError(f"{source}: tensor {skey} {tuple(value.shape)} does not fit {tkey} {tuple(expected.shape)}; "
                              "it is a checkpoint of another architecture")
        out[tkey] = value
    return out


def _image_size_from(state: dict[str, Any], skeleton: Any) -> int | None:
    """The native image size implied by a checkpoint's position embeddings, when it differs from the build's."""
    pos = state.get("pos_embed")
    if pos is None or pos.dim() != 3:
        return None
    patch = skeleton.patch_embed.patch_size[0]
    own = 0 if getattr(skeleton, "no_embed_class", False) else skeleton.num_prefix_tokens
    for extra in (own, 1):  # a Hugging Face class position not folded yet counts as 1
        side = round((pos.shape[1] - extra) ** 0.5)
        if side * side == pos.shape[1] - extra:
            return None if side * patch == skeleton.patch_embed.img_size[0] else side * patch
    return None


def check_fit(state: dict[str, Any], model_state: dict[str, Any], source: str, name: str) -> None:
    """Raise a WsisegError listing missing, unexpected and mis-shaped keys, if any."""
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(model_state[k].shape)}"
                  for k in model_state if k in state and tuple(state[k].shape) != tuple(model_state[k].shape)]
    if not (missing or unexpected or mismatched):
        return

    def show(label: str, items: list[str]) -> str:
        return f"{len(items)} {label} ({', '.join(items[:6])}{', ...' if len(items) > 6 else ''})" if items else ""

    problems = "; ".join(p for p in (show("missing", missing), show("unexpected", unexpected),
                                     show("shape mismatches", mismatched)) if p)
    raise WsisegError(f"weights {source} do not fit {name}: {problems}; check model.name matches the checkpoint")


def load_backbone_weights(name: str, path: Path, device: str = "cpu", **kwargs: Any) -> Any:
    """Build `name` on the meta device and load the weights at `path` into it strictly, then move to `device`."""
    from wsiseg.models.registry import create, entry

    found = entry(name)
    source = resolve_weights_file(path)
    if found.kind == "cnn":
        return _load_cnn(name, source, device, **kwargs)
    raw = strip_prefixes(unwrap(read_state_dict(source)))
    if found.remap == "musk":
        from wsiseg.models.musk import remap_published

        raw = remap_published(raw, str(source))
    skeleton = create(name, "meta", **kwargs)
    state = remap_hf(raw, skeleton) if is_hf_layout(raw) else raw
    image_size = _image_size_from(state, skeleton) if "img_size" not in kwargs else None
    if image_size:
        log.info("%s: checkpoint position embeddings are for %d px; building at that size", name, image_size)
        skeleton = create(name, "meta", img_size=image_size, **kwargs)
        state = remap_hf(raw, skeleton) if is_hf_layout(raw) else raw
    return _assign(skeleton, state, str(source), name, "cpu" if device == "meta" else device)


def _load_cnn(name: str, source: Path, device: str, **kwargs: Any) -> Any:
    """Load a CNN; keys of the classifier head, which a feature extractor lacks, are dropped."""
    from wsiseg.models.registry import create, entry

    skeleton = create(name, "meta", **kwargs)
    full = create(name, "meta", **{**kwargs, "classifier": True}).state_dict()
    state = strip_prefixes(unwrap(read_state_dict(source)))
    if entry(name).remap == "in_order" and not set(state) <= set(full):
        state = remap_in_order(state, full, str(source))
    head = set(full) - set(skeleton.state_dict())
    return _assign(skeleton, {k: v for k, v in state.items() if k not in head}, str(source), name,
                   "cpu" if device == "meta" else device)


def _assign(model: Any, state: dict[str, Any], source: str, name: str, device: str) -> Any:
    """Strictly load `state` into the meta-built `model` with assign, cast to float32, move to `device`."""
    import torch

    model_state = model.state_dict()
    check_fit(state, model_state, source, name)
    state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"{name}: tensors left on the meta device after loading: {leftover[:5]}")
    return model.to(torch.device(device))
