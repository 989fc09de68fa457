"""M2DINO: a DINOv3 encoder with task-conditioned MoE blocks, one shared feature map, task heads.

Wang, Akumu et al., "Understanding Task Aggregation for Generalizable Ultrasound Foundation
Models" (arXiv 2603.18123, 2026). The MLPs of the last K transformer blocks become
Mixture-of-Experts layers (:mod:`taskgroup.models.moe`) routed by a learned per-task embedding;
the patch tokens of the last block (optionally fused with intermediate blocks) form one shared
spatial feature map (B, C, H/p, W/p) that every task head reads.

Parameters are split so that later stages can measure per-task gradients and use separate
learning rates: :meth:`M2DINO.shared_parameters` (encoder, experts, routers, neck) and
:meth:`M2DINO.task_parameters` (a task's head and its task embedding).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from taskgroup.config import ModelConfig
from taskgroup.models.backbone import build_backbone, freeze_backbone
from taskgroup.models.heads import build_head
from taskgroup.models.moe import TaskMoE
from taskgroup.tasks import TaskSpec


class FeatureNeck(nn.Module):
    """Fuses the normalised token maps of several blocks (same scale) by 1x1 convs and a sum."""

    def __init__(self, channels: int, inputs: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(inputs))

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([p(m) for p, m in zip(self.proj, maps, strict=True)]).sum(dim=0)


class M2DINO(nn.Module):
    """Multi-task model: ``model(images, task_id)`` gives the task head's output."""

    def __init__(
        self,
        backbone: nn.Module,
        tasks: Sequence[TaskSpec],
        heads: dict[str, nn.Module],
        task_embed_dim: int = 0,
        feature_blocks: Sequence[int] = (-1,),
        aux_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.tasks = {t.id: t for t in tasks}
        self.task_index = {t.id: i for i, t in enumerate(tasks)}
        self.heads = nn.ModuleDict(heads)
        self.task_embeddings = nn.ParameterDict(
            {t.id: nn.Parameter(torch.randn(task_embed_dim)) for t in tasks} if task_embed_dim else {}
        )
        depth = len(backbone.blocks)
        self.feature_blocks = sorted({b % depth for b in feature_blocks})
        channels = backbone.embed_dim
        self.neck = FeatureNeck(channels, len(self.feature_blocks)) if len(self.feature_blocks) > 1 else None
        self.aux_weight = aux_weight
        self.image_size = backbone.patch_embed.img_size[0]
        self.patch_size = backbone.patch_embed.patch_size[0]
        self.out_channels = channels

    # -- routing ----------------------------------------------------------------------------
    @property
    def moe_layers(self) -> dict[str, TaskMoE]:
        return {name: m for name, m in self.named_modules() if isinstance(m, TaskMoE)}

    def _task_ids(self, task: str | Sequence[str], batch: int, device: torch.device) -> torch.Tensor:
        if isinstance(task, str):
            if task not in self.task_index:
                raise KeyError(f"the model has no task {task!r}; it has {', '.join(self.task_index)}")
            return torch.full((batch,), self.task_index[task], dtype=torch.long, device=device)
        return torch.tensor([self.task_index[t] for t in task], dtype=torch.long, device=device)

    def _set_routing(self, task_ids: torch.Tensor) -> None:
        layers = self.moe_layers
        if not layers:
            return
        table = (
            torch.stack([self.task_embeddings[t] for t in self.tasks]) if len(self.task_embeddings) else None
        )
        for layer in layers.values():
            layer.set_context(task_ids, table)

    def aux_loss(self) -> torch.Tensor:
        """The weighted MoE load-balancing loss of the last forward (0 without MoE)."""
        layers = list(self.moe_layers.values())
        if not layers or self.aux_weight == 0:
            return torch.zeros((), device=self.backbone.cls_token.device)
        return self.aux_weight * torch.stack([m.aux_loss for m in layers]).mean()

    def expert_load(self) -> dict[str, dict[str, torch.Tensor]]:
        """Token-slots sent to each expert while training: {layer: {task: (E,)}}."""
        return {
            name: {t: m.load[i].clone() for t, i in self.task_index.items()}
            for name, m in self.moe_layers.items()
        }

    def reset_expert_load(self) -> None:
        for m in self.moe_layers.values():
            m.reset_load()

    # -- forward ----------------------------------------------------------------------------
    def features(self, images: torch.Tensor, task: str | Sequence[str]) -> torch.Tensor:
        """The shared spatial feature map (B, C, H/p, W/p) for images of the given task(s)."""
        self._set_routing(self._task_ids(task, images.shape[0], images.device))
        maps = self.backbone.forward_intermediates(
            images, indices=self.feature_blocks, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        return self.neck(maps) if self.neck is not None else maps[-1]

    def forward(self, images: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](self.features(images, task))

    # -- parameters -------------------------------------------------------------------------
    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Encoder, MoE experts and routers, neck: what every task's gradient reaches."""
        yield from (p for p in self.backbone.parameters() if p.requires_grad)
        if self.neck is not None:
            yield from self.neck.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """A task's own head and task embedding."""
        yield from self.heads[task].parameters()
        if task in self.task_embeddings:
            yield self.task_embeddings[task]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``encoder``: pretrained encoder weights (experts included, they are copies of them);
        ``new``: weights that start from scratch (routers, neck, heads, task embeddings)."""
        encoder, new = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_encoder = name.startswith("backbone.") and ".router." not in name
            (encoder if is_encoder else new).append(p)
        return {"encoder": encoder, "new": new}


def convert_to_moe(
    backbone: nn.Module,
    num_layers: int,
    num_experts: int,
    top_k: int,
    routing: str,
    task_embed_dim: int,
    num_tasks: int,
) -> int:
    """Replace the MLP of the last ``num_layers`` blocks (clamped to the depth) by upcycled MoE
    layers; returns how many blocks were converted."""
    blocks = backbone.blocks
    count = min(num_layers, len(blocks))
    for block in list(blocks)[len(blocks) - count :]:
        block.mlp = TaskMoE(
            block.mlp, backbone.embed_dim, num_experts, top_k, routing, task_embed_dim, num_tasks
        )  # type: ignore[arg-type]
    return count


def build_model(cfg: ModelConfig, tasks: Sequence[TaskSpec]) -> M2DINO:
    """M2DINO from a config: backbone (weights loaded if named), MoE upcycled from it, heads."""
    backbone = build_backbone(cfg.backbone)
    moe = cfg.moe
    routing = {"moe": "token", "task": "task", "task_token": "task_token"}.get(moe.mode)
    task_embed_dim = 0
    if routing is not None:
        task_embed_dim = moe.task_embed_dim if routing != "token" else 0
        convert_to_moe(
            backbone, moe.num_layers, moe.num_experts, moe.top_k, routing, task_embed_dim, len(tasks)
        )
    freeze_backbone(backbone, cfg.backbone.freeze_blocks, cfg.backbone.freeze_encoder)
    image_size = backbone.patch_embed.img_size[0]
    patch_size = backbone.patch_embed.patch_size[0]
    heads = {t.id: build_head(t, backbone.embed_dim, patch_size, image_size, cfg.heads.hidden) for t in tasks}
    feature_blocks = (*cfg.heads.neck_blocks, -1)
    return M2DINO(backbone, tasks, heads, task_embed_dim, feature_blocks, moe.aux_weight if routing else 0.0)
