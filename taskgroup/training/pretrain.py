"""An encoder pretrained once on synthetic images, cached, for the embedded benchmark.

Real use starts from a pretrained DINOv3; a tiny ViT trained from scratch for a few CPU minutes
leaves many synthetic tasks at chance. ``backbone.pretrained: synthetic`` stands for an encoder
of the configured architecture pretrained on generic pretext tasks of separate synthetic images
(:func:`taskgroup.data.synthetic.pretext_registry`: structure map and noise-free echogenicity,
no benchmark task's label), trained by the same engine and cached by architecture in
``data.cache_dir/encoders/``. Built on first use; later runs load the file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from safetensors.torch import save

from taskgroup.config import BackboneConfig, DataConfig, MoEConfig, RunConfig, TrainConfig, config_hash
from taskgroup.data.synthetic import PRETEXT_TASKS, PRETEXT_VERSION, generate_pretext, pretext_registry
from taskgroup.runtime import atomic_write_bytes, load_state
from taskgroup.training.data import build_lock, generate_once, prepare_data
from taskgroup.training.run import train_network

log = logging.getLogger("taskgroup")

SYNTHETIC = "synthetic"


def _pretext_backbone(cfg: RunConfig) -> BackboneConfig:
    """The architecture of ``cfg``'s backbone, as the pretext network trains it."""
    return dataclasses.replace(cfg.model.backbone, pretrained=None, freeze_blocks=0, freeze_encoder=False)


def _encoder_key(cfg: RunConfig) -> str:
    images, steps = cfg.data.pretext_images, cfg.data.pretext_steps
    return config_hash(
        {"backbone": _pretext_backbone(cfg), "images": images, "steps": steps, "version": PRETEXT_VERSION}
    )


def synthetic_encoder_path(cfg: RunConfig) -> Path:
    """Where the synthetic-pretrained encoder for ``cfg``'s backbone is cached (built or not)."""
    cache = Path(os.path.expanduser(cfg.data.cache_dir))
    return cache / "encoders" / f"synthetic-{_encoder_key(cfg)}.safetensors"


def synthetic_encoder(cfg: RunConfig) -> Path:
    """The cached synthetic-pretrained encoder for ``cfg``'s backbone (built if missing), from
    ``data.pretext_images`` images and ``data.pretext_steps`` steps."""
    backbone = _pretext_backbone(cfg)
    cache = Path(os.path.expanduser(cfg.data.cache_dir))
    key = _encoder_key(cfg)
    path = synthetic_encoder_path(cfg)
    if path.is_file():
        return path
    with build_lock(path):
        if path.is_file():  # built by another process while this one waited
            return path
        _pretrain(cfg, backbone, cache, key, path)
    return path


def _pretrain(cfg: RunConfig, backbone: BackboneConfig, cache: Path, key: str, path: Path) -> None:
    """Generate the pretext images, train the encoder on them, save its weights at ``path``."""
    images, steps = cfg.data.pretext_images, cfg.data.pretext_steps
    root = generate_once(
        cache / f"pretext-v{PRETEXT_VERSION}-{images}", lambda tmp: generate_pretext(tmp, images)
    )
    pretext_cfg = RunConfig(
        model=dataclasses.replace(cfg.model, backbone=backbone, moe=MoEConfig(mode="dense")),
        data=DataConfig(
            root=str(root),
            image_size=cfg.data.image_size,
            batch_size=cfg.data.batch_size,
            cache_dir=cfg.data.cache_dir,
        ),
        train=TrainConfig(
            steps=steps,
            eval_every=steps,
            checkpoint_every=250,
            lr_encoder=1e-3,
            lr_heads=1e-3,
            warmup_steps=100,
            threads=cfg.train.threads,
            device=cfg.train.device,
            seed=cfg.train.seed,
        ),
    )
    registry = pretext_registry()
    data = prepare_data(pretext_cfg.data, registry, PRETEXT_TASKS)
    run_dir = cache / "encoders" / f"pretext-run-{key}"
    log.info("pretraining the synthetic encoder into %s", path)
    train_network(pretext_cfg, registry, PRETEXT_TASKS, run_dir, "pretext", data)
    state = load_state(run_dir / "checkpoints" / "last.pt")["model"]
    encoder = {k[len("backbone.") :]: v.contiguous() for k, v in state.items() if k.startswith("backbone.")}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(encoder))


def resolve_pretrained(cfg: RunConfig, build: bool = True) -> RunConfig:
    """``backbone.pretrained: synthetic`` -> the cached synthetic-pretrained encoder's file
    (pretrained first when missing; with ``build=False`` only its path, e.g. to compare a config
    with a run folder's before any training)."""
    if cfg.model.backbone.pretrained != SYNTHETIC:
        return cfg
    path = synthetic_encoder(cfg) if build else synthetic_encoder_path(cfg)
    backbone = dataclasses.replace(cfg.model.backbone, pretrained=str(path))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=backbone))
