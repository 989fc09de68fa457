"""The DINOv3 ViT encoder, from timm, and loading its weights from a local file.

Any timm DINOv3 model works by name (``vit_small_patch16_dinov3`` ... ``vit_large_patch16_dinov3``),
and any of its sizes can be overridden (depth, width, heads, patch) down to a 2-block toy for
CPU tests. Nothing is downloaded: pretrained weights come from a file the user names, in timm's
own key names or in the official DINOv3 release's (``storage_tokens``, ``ls1.gamma``, ...), which
timm's Eva ``checkpoint_filter_fn`` maps (and whose patch embedding and position embedding it
resamples when the patch or image size differs).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models import eva
from torch import nn

from taskgroup.config import BackboneConfig
from taskgroup.errors import ConfigError


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """A timm DINOv3 ViT without classifier (``num_classes=0``), weights loaded if named."""
    if "dinov3" not in cfg.name:
        raise ConfigError(
            f"backbone {cfg.name!r}: expected a timm DINOv3 model, e.g. vit_small_patch16_dinov3"
        )
    overrides = {
        k: v
        for k, v in {
            "patch_size": cfg.patch_size,
            "depth": cfg.depth,
            "embed_dim": cfg.embed_dim,
            "num_heads": cfg.num_heads,
        }.items()
        if v is not None
    }
    try:
        model = timm.create_model(
            cfg.name,
            pretrained=False,
            num_classes=0,
            img_size=cfg.img_size,
            drop_path_rate=cfg.drop_path_rate,
            **overrides,
        )
    except RuntimeError as exc:  # timm's "Unknown model"
        raise ConfigError(f"backbone {cfg.name!r}: {exc}") from None
    if cfg.pretrained == "synthetic":
        raise ConfigError(
            "backbone.pretrained 'synthetic' names the cached synthetic-pretrained encoder: resolve it "
            "first with taskgroup.training.pretrain.resolve_pretrained (taskgroup train does)"
        )
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch checkpoint (tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pretrained weights {path}: file not found (nothing is downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"pretrained weights {path}: cannot be read as a torch checkpoint: {exc}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"pretrained weights {path}: expected a state dict, got {type(state).__name__}")
    return state


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load weights from ``path`` into a timm DINOv3 model; a clear error lists keys or shapes
    that do not fit."""
    state = eva.checkpoint_filter_fn(read_state_dict(path), model)
    own = model.state_dict()
    wrong_shape = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    # rope periods are recomputed by the model, never stored in a checkpoint
    missing = [k for k in own if k not in state and "rope" not in k]
    unexpected = [k for k in state if k not in own]
    if wrong_shape or missing or unexpected:
        parts = []
        if wrong_shape:
            parts.append(f"shapes that do not fit: {'; '.join(wrong_shape[:5])}")
        if missing:
            parts.append(
                f"missing from the file: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        if unexpected:
            parts.append(
                f"not in the model: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
            )
        raise ConfigError(f"pretrained weights {path} do not fit the backbone: " + " | ".join(parts))
    model.load_state_dict(state, strict=False)


def freeze_backbone(model: nn.Module, blocks: int = 0, everything: bool = False) -> None:
    """Freeze the patch embedding, prefix tokens and the first ``blocks`` blocks, or every weight
    (MoE routers excepted: they are new and must learn)."""
    if everything:
        for name, p in model.named_parameters():
            if ".router." not in name:
                p.requires_grad_(False)
        return
    if blocks <= 0:
        return
    frozen: list[nn.Module | nn.Parameter] = [model.patch_embed]
    frozen += [
        getattr(model, n)
        for n in ("cls_token", "reg_token", "pos_embed")
        if getattr(model, n, None) is not None
    ]
    frozen += list(model.blocks[:blocks])
    for item in frozen:
        params = item.parameters() if isinstance(item, nn.Module) else [item]
        for p in params:
            p.requires_grad_(False)
