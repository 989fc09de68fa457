"""Gradient-based affinity, measured by probes during one real multi-task training run.

Every ``every`` steps (the lookahead every ``lookahead_every``: it costs about nine times a
gradient probe), after the optimiser step, :class:`AffinityProbe` draws one fresh batch per
task (each task's own images: in FM_UIA an image carries one task's label) and computes on the
*shared* parameters (encoder, experts, routers, neck; optionally only the last N blocks):

- the per-task gradients ``g_i`` of ``L_i`` (27 backward passes), stacked into one matrix so
  that the Gram matrix of all tasks is one product per probe, not 27 x 27 dot products;
- ``gradient``: cosine similarity, the first-order lookahead ``lr * <g_i, g_j> / L_j`` and the
  sign of ``<g_i, g_j>`` (conflict rate = share of probes where it is negative);
- ``lookahead`` (TAG, Fifty et al. 2021): for each source ``i``, one step on the shared
  parameters with ``g_i`` alone *through the real optimiser* (AdamW with its moments and step
  count), then ``Z[i, j] = 1 - L_j(after) / L_j(before)`` on every target's batch; the
  parameters and the optimiser state are restored exactly, so training goes on as if no probe
  had run (a test checks that a probed run's metrics equal an unprobed one's). As TAG does, Z is
  divided by the learning rate of the step (the encoder's), so probes at different points of the
  schedule are comparable; the raw Z is kept too.

And once, at the end of the training:

- ``readout``: which channels of the shared feature map each task's head *uses*. For every task,
  on ``readout_batches`` fresh batches of its own images, the attribution profile
  ``a_t[c] = mean |F_c * dL_t/dF_c|`` over images and tokens of the feature map ``F`` (gradient
  times input, per channel); each profile is divided by its mean, centred by the mean profile
  over the tasks measured, and ``R[i, j]`` is the cosine of the profiles of ``i`` and ``j``
  (symmetric). Gradient cosine and lookahead compare what two tasks would *change* in the
  encoder, through heads that are still nearly random early on; the readout compares what the
  trained heads *read*, which does not depend on the heads' own directions. A task-embedding
  idea in the spirit of Task2Vec (Achille et al. 2019, Fisher information of a probe network),
  written here because no installed library computes it. The run is repeated with
  ``affinity.runs`` seeds and averaged (the heads' random starts are the readout's main noise).
- ``attribution``: *where* in an image each task's head looks. One shared probe set (the
  ``attribution_images`` first images of a fresh batch of every task, so every head sees the
  same images, whatever task they come from); per task, a label-free score of its head's output
  (:data:`HEAD_SCORES`: predicted foreground mass, log-probability of the predicted class, box
  or keypoint coordinates) and its attribution map ``m_t[n, k] = sum_c |F_c * ds_t/dF_c|`` over
  the tokens k of image n (gradient times input, summed over channels), F the shared feature map
  or, with ``attribution_layer="input"``, the patch embeddings. Each map is divided
  by its sum and centred over its tokens, then centred by the mean map over the tasks on that
  image (what every head looks at says nothing about a pair); ``R[i, j]`` is the cosine of the
  maps of i and j averaged over the images. The transferability-from-attribution-maps idea
  (Song et al., NeurIPS 2019: tasks whose models attribute to the same inputs on a shared probe
  set transfer to each other), written here because no installed library computes task
  similarity from attribution maps (gradient times input is two lines of autograd). Tasks that
  need the same structure of an image look at the same place.

Convention everywhere: ``A[i, j]`` = effect of source ``i`` on target ``j``; positive = helps.
Probes run in eval mode (no expert-load counting; the ViT has no dropout or batch norm, so the
losses are those of training mode). The lookahead clips ``g_i`` to ``train.grad_clip`` as the
real step clips the gradient.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from taskgroup.kinds import KINDS, kind_entry
from taskgroup.models import M2DINO
from taskgroup.tasks import TaskKind
from taskgroup.training import Callback, Engine, StepOutput

#: quantities recorded per probe, each a (tasks, tasks) matrix: source rows, target columns
GRADIENT_QUANTITIES = ("cosine", "first_order", "conflict")
LOOKAHEAD_QUANTITIES = ("lookahead", "lookahead_raw")
READOUT_QUANTITIES = ("readout",)
ATTRIBUTION_QUANTITIES = ("attribution",)


#: the label-free score of a head's output whose attribution map says where the head looks,
#: by task kind: the ``score`` of each entry of :mod:`taskgroup.kinds`
HEAD_SCORES = {kind: entry.score for kind, entry in KINDS.items()}


def attribution_maps(
    model: M2DINO,
    task: str,
    kind: TaskKind,
    images: torch.Tensor,
    autocast=contextlib.nullcontext,
    layer: Literal["features", "input"] = "features",
) -> torch.Tensor:
    """Where ``task``'s head looks on ``images``: ``sum_c |F_c * ds/dF_c|`` per token (N, h, w),
    for the label-free score s of :data:`HEAD_SCORES`; ``autocast`` is the engine's
    mixed-precision context (none on the CPU). ``layer``: F is the shared feature map
    (``features``: what the head reads) or the patch embeddings (``input``: the encoder's
    attention lets any token of the shared map carry a structure from elsewhere, so a pooled
    head's map there is spread; on the patch embeddings the attribution goes back to where the
    structure is, as in the input attribution maps of Song et al. 2019)."""
    if layer == "features":
        with torch.no_grad(), autocast():
            features = model.features(images, task)
        features = features.float().requires_grad_(True)
        with autocast():
            output = model.heads[task](features)
        (grad,) = torch.autograd.grad(kind_entry(kind).score(output), features)
        return (features * grad).detach().abs().sum(dim=1)
    if layer != "input":
        raise ValueError(f"attribution layer must be 'features' or 'input', got {layer!r}")
    images = images.detach().requires_grad_(True)  # a graph to the embeddings with a frozen encoder too
    captured: list[torch.Tensor] = []
    hook = model.backbone.patch_embed.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with autocast():
            output = model(images, task)
    finally:
        hook.remove()
    (embedded,) = captured  # the patch tokens, channels last, before the prefix tokens are added
    (grad,) = torch.autograd.grad(kind_entry(kind).score(output), embedded)
    per_token = (embedded.float() * grad.float()).detach().abs().sum(dim=-1)  # (N, h, w) or (N, h*w)
    return per_token.reshape(len(per_token), model.image_size // model.patch_size, -1)


#: a head's output per image as a vector whose L1 change says how much an occlusion moved it,
#: by task kind: the ``output`` of each entry of :mod:`taskgroup.kinds`
HEAD_OUTPUTS = {kind: entry.output for kind, entry in KINDS.items()}


def occlusion_maps(
    model: M2DINO,
    task: str,
    kind: TaskKind,
    images: torch.Tensor,
    autocast=contextlib.nullcontext,
    cell: int = 16,
    chunk: int = 256,
) -> torch.Tensor:
    """Where ``task``'s head looks on ``images`` by occlusion (Zeiler and Fergus 2014): for every
    ``cell`` x ``cell`` square of an image, the L1 change of the head's output
    (:data:`HEAD_OUTPUTS`) when that square alone is set to 0 (the normalisation mean), (N,
    H/cell, W/cell). Gradient times input reads a pooled head through its local slope, which
    a confident softmax flattens and which follows feature magnitude wherever it is; occlusion
    asks what the whole network's output depends on, so a classification head that reads a
    position is attributed to the structure that carries it. Cost: N * (H/cell) * (W/cell)
    forward passes, no backward. Written here (a mask and a forward) rather than taken from
    Captum, which is not a dependency."""
    count, _, height, width = images.shape
    if height % cell or width % cell:
        raise ValueError(f"occlusion cell {cell} px does not divide the {height}x{width} images")
    rows, cols = height // cell, width // cell
    output_of = kind_entry(kind).output
    with torch.no_grad():
        with autocast():
            base = output_of(model(images, task))  # (N, D)
        # (cells, 1, H, W): 1 outside the cell, 0 inside
        keep = torch.ones(rows * cols, 1, height, width, device=images.device, dtype=images.dtype)
        for index in range(rows * cols):
            r, c = divmod(index, cols)
            keep[index, :, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = 0
        changes = []
        per_chunk = max(1, chunk // (rows * cols))
        for start in range(0, count, per_chunk):
            part = images[start : start + per_chunk]
            occluded = (part[:, None] * keep[None]).flatten(0, 1)  # (n * cells, C, H, W)
            with autocast():
                moved = output_of(model(occluded, task)).view(len(part), rows * cols, -1)
            changes.append((moved - base[start : start + per_chunk, None]).abs().sum(dim=-1))
    return torch.cat(changes).view(count, rows, cols).float()


#: how a head's map is made: ``gradient`` (gradient times input, :func:`attribution_maps`),
#: ``occlusion`` (:func:`occlusion_maps`), ``hybrid`` (occlusion for classification heads,
#: gradient times input for the others, both on the occlusion cells)
ATTRIBUTION_MAPS = ("gradient", "occlusion", "hybrid")


def occludes(how: str, kind: TaskKind) -> bool:
    """Whether a head of ``kind`` has its map made by occlusion under ``how`` (``hybrid``: the
    heads that pool the whole feature map, ``pooled`` in :mod:`taskgroup.kinds`)."""
    return how == "occlusion" or (how == "hybrid" and kind_entry(kind).pooled)


def head_map(
    model: M2DINO,
    task: str,
    kind: TaskKind,
    images: torch.Tensor,
    autocast=contextlib.nullcontext,
    how: Literal["gradient", "occlusion", "hybrid"] = "gradient",
    layer: Literal["features", "input"] = "features",
    cell: int = 16,
) -> torch.Tensor:
    """``task``'s map on ``images`` made as ``how`` says (:data:`ATTRIBUTION_MAPS`): (N, h, w)
    tokens for ``gradient``, (N, H/cell, W/cell) cells otherwise. ``hybrid``: a classification
    head pools the whole feature map, so its gradient times input is the same slope at every
    token times each token's features (where features are large, whatever the label needs) and
    a confident softmax flattens that slope; occlusion asks what its output depends on. Dense
    heads (segmentation, detection, regression) read their structure where it lies and their
    gradient times input is local, so it is kept, averaged over each cell's tokens so that
    every map of a probe set has the same grid."""
    if how not in ATTRIBUTION_MAPS:
        raise ValueError(f"attribution map must be one of {', '.join(ATTRIBUTION_MAPS)}, got {how!r}")
    if occludes(how, kind):
        return occlusion_maps(model, task, kind, images, autocast, cell)
    found = attribution_maps(model, task, kind, images, autocast, layer)
    if how == "gradient":
        return found
    cells = (images.shape[-2] // cell, images.shape[-1] // cell)
    return torch.nn.functional.adaptive_avg_pool2d(found[:, None], cells)[:, 0]  # (N, H/cell, W/cell)


def probe_parameters(model: M2DINO, blocks: int = 0) -> list[nn.Parameter]:
    """The shared parameters a probe measures on: all of them (``blocks`` 0), or those of the last
    ``blocks`` encoder blocks with the final norm and the neck (what every head reads)."""
    shared = list(model.shared_parameters())
    if blocks <= 0:
        return shared
    depth = len(model.backbone.blocks)
    prefixes = tuple(f"backbone.blocks.{i}." for i in range(max(0, depth - blocks), depth))
    prefixes += ("backbone.norm.", "neck.")
    keep = {id(p) for name, p in model.named_parameters() if name.startswith(prefixes)}
    return [p for p in shared if id(p) in keep]


class AffinityProbe(Callback):
    """Records gradient and/or lookahead affinity every ``every`` steps (see the module doc)."""

    def __init__(
        self,
        every: int,
        lookahead: bool = True,
        gradient: bool = True,
        blocks: int = 0,
        batch: int | None = None,
        lookahead_every: int | None = None,
        readout: bool = False,
        readout_batches: int = 4,
        attribution: bool = False,
        attribution_images: int = 4,
        attribution_layer: Literal["features", "input"] = "features",
        attribution_map: Literal["gradient", "occlusion", "hybrid"] = "gradient",
        occlusion_cell: int = 16,
    ) -> None:
        if not (lookahead or gradient or readout or attribution):
            raise ValueError(
                "an affinity probe needs lookahead, gradient, readout, attribution or some of them"
            )
        self.every = every
        self.lookahead_every = lookahead_every or every
        self.lookahead = lookahead
        self.gradient = gradient
        self.readout = readout
        self.readout_batches = readout_batches
        self.profiles: np.ndarray | None = None  # (tasks, channels) readout profiles
        self.attribution = attribution
        self.attribution_images = attribution_images
        self.attribution_layer = attribution_layer
        self.attribution_map = attribution_map
        self.occlusion_cell = occlusion_cell
        self.maps: np.ndarray | None = None  # (tasks, images, tokens) attribution maps
        self.blocks = blocks
        self.batch = batch
        self.steps: dict[str, list[int]] = {}  # quantity -> steps it was probed at
        self.lr: dict[str, list[float]] = {}
        self.values: dict[str, list[np.ndarray]] = {}
        self.cost = {"probes": 0, "forward": 0, "backward": 0, "optimiser_steps": 0, "seconds": 0.0}

    # -- state (checkpointed with the run: a resumed run keeps the probes already taken) -------
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "lr": self.lr,
            "values": self.values,
            "cost": self.cost,
            "profiles": self.profiles,
            "maps": self.maps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = {k: list(v) for k, v in state.get("steps", {}).items()}
        self.lr = {k: list(v) for k, v in state.get("lr", {}).items()}
        self.values = {k: list(v) for k, v in state.get("values", {}).items()}
        self.cost = dict(state.get("cost", self.cost))
        self.profiles = state.get("profiles")
        self.maps = state.get("maps")

    def on_step_end(self, engine: Engine, output: StepOutput) -> None:
        gradient = self.gradient and output.step % self.every == 0
        lookahead = self.lookahead and output.step % self.lookahead_every == 0
        if gradient or lookahead:
            self.probe(engine, gradient=gradient, lookahead=lookahead)

    def on_train_end(self, engine: Engine) -> None:
        if self.readout:
            self.read_out(engine)
        if self.attribution:
            self.attribute(engine)

    # -- the probe ----------------------------------------------------------------------------
    def _loss(self, engine: Engine, task: str, batch) -> torch.Tensor:
        with engine.autocast():
            return engine.loss(task, engine.model(engine.images(batch), task), batch)

    @torch.no_grad()
    def _all_losses(self, engine: Engine, tasks: list[str], batches) -> np.ndarray:
        """Every task's loss on its own batch, in one batched forward of the encoder (per-sample
        task routing), then each head on its slice: 27 small forwards cost more on a CPU."""
        images = torch.cat([engine.images(batches[t]) for t in tasks])
        ids = [t for t in tasks for _ in range(batches[t].images.shape[0])]
        out = np.zeros(len(tasks))
        with engine.autocast():
            features = engine.model.features(images, ids)
            start = 0
            for k, task in enumerate(tasks):
                n = batches[task].images.shape[0]
                out[k] = float(
                    engine.loss(task, engine.model.heads[task](features[start : start + n]), batches[task])
                )
                start += n
        return out

    def probe(self, engine: Engine, gradient: bool | None = None, lookahead: bool | None = None) -> None:
        """One probe now (default: every quantity this probe records)."""
        gradient = self.gradient if gradient is None else gradient
        lookahead = self.lookahead if lookahead is None else lookahead
        start = time.perf_counter()
        model, optimiser = engine.model, engine.optimiser
        tasks = list(engine.tasks)
        params = probe_parameters(model, self.blocks)
        batches = {t: engine.probe_batch(t, salt=1, size=self.batch) for t in tasks}
        was_training = model.training
        model.eval()
        grads = torch.zeros(len(tasks), sum(p.numel() for p in params), device=engine.device)
        before = torch.zeros(len(tasks), dtype=torch.float64)
        for k, task in enumerate(tasks):
            loss = self._loss(engine, task, batches[task])
            found = torch.autograd.grad(loss, params, allow_unused=True)
            grads[k] = torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(found, params, strict=True)
                ]
            ).float()
            before[k] = float(loss.detach())
        self.cost["forward"] += len(tasks)
        self.cost["backward"] += len(tasks)
        lr = float(next(g["lr"] for g in optimiser.param_groups if g.get("name") == "encoder"))
        record: dict[str, np.ndarray] = {}
        if gradient:
            gram = (grads @ grads.T).double().cpu()
            norms = gram.diagonal().clamp_min(1e-30).sqrt()
            record["cosine"] = (gram / norms[:, None] / norms[None, :]).numpy()
            record["first_order"] = (lr * gram / before.clamp_min(1e-12)[None, :]).numpy()
            record["conflict"] = (gram < 0).double().numpy()
        if lookahead:
            raw = self._lookahead(engine, params, grads, batches, before.numpy())
            record["lookahead_raw"] = raw
            # a step at learning rate 0 (the end of the cosine schedule) measures nothing: NaN,
            # left out of the mean
            record["lookahead"] = raw / lr if lr > 0 else np.full_like(raw, np.nan)
        model.train(was_training)
        for name, matrix in record.items():
            self.values.setdefault(name, []).append(matrix)
            self.steps.setdefault(name, []).append(engine.step)
            self.lr.setdefault(name, []).append(lr)
        self.cost["probes"] += 1
        self.cost["seconds"] += time.perf_counter() - start

    @torch.no_grad()
    def _lookahead(self, engine: Engine, params, grads, batches, before: np.ndarray) -> np.ndarray:
        model, optimiser = engine.model, engine.optimiser
        tasks = list(engine.tasks)
        saved = [p.detach().clone() for p in params]
        saved_state = {
            p: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimiser.state[p].items()}
            for p in params
            if p in optimiser.state
        }
        sizes = [p.numel() for p in params]
        before = np.maximum(before, 1e-12)
        out = np.zeros((len(tasks), len(tasks)))
        for i in range(len(tasks)):
            model.zero_grad(set_to_none=True)
            g = grads[i]
            clip = engine.cfg.grad_clip
            if clip:
                g = g * min(1.0, clip / (float(g.norm()) + 1e-6))
            for p, piece in zip(params, torch.split(g, sizes), strict=True):
                p.grad = piece.view_as(p).to(p.dtype)
            optimiser.step()  # only the shared parameters have a gradient: only they move
            self.cost["optimiser_steps"] += 1
            out[i] = 1.0 - self._all_losses(engine, tasks, batches) / before
            self.cost["forward"] += len(tasks)
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
            for p in params:
                if p in saved_state:
                    optimiser.state[p] = {
                        k: v.clone() if torch.is_tensor(v) else v for k, v in saved_state[p].items()
                    }
                else:
                    optimiser.state.pop(p, None)
        model.zero_grad(set_to_none=True)
        return out

    def read_out(self, engine: Engine) -> None:
        """The readout profiles and their similarity now (see the module doc)."""
        start = time.perf_counter()
        model = engine.model
        tasks = list(engine.tasks)
        was_training = model.training
        model.eval()
        profiles = []
        for task in tasks:
            total = None
            for salt in range(self.readout_batches):
                batch = engine.probe_batch(task, salt=100 + salt, size=self.batch)
                with engine.autocast():
                    features = model.features(engine.images(batch), task).detach().requires_grad_(True)
                    loss = engine.loss(task, model.heads[task](features), batch)
                (grad,) = torch.autograd.grad(loss, features)
                part = (features * grad).detach().abs().float().mean(dim=(0, 2, 3)).double().cpu()
                total = part if total is None else total + part
            profiles.append(total / self.readout_batches)
        model.train(was_training)
        self.profiles = torch.stack(profiles).numpy()
        self.values["readout"] = [readout_similarity(self.profiles)]
        self.steps["readout"] = [engine.step]
        self.lr["readout"] = [float("nan")]
        self.cost["forward"] += len(tasks) * self.readout_batches
        self.cost["backward"] += len(tasks) * self.readout_batches
        self.cost["seconds"] += time.perf_counter() - start

    def attribute(self, engine: Engine) -> None:
        """The attribution maps of every task's head on the shared probe set, and their
        similarity, now (see the module doc)."""
        start = time.perf_counter()
        model = engine.model
        tasks = list(engine.tasks)
        was_training = model.training
        model.eval()
        images = torch.cat(
            [engine.images(engine.probe_batch(t, salt=300, size=self.attribution_images)) for t in tasks]
        )
        maps = []
        for task in tasks:
            found = head_map(
                model,
                task,
                engine.tasks[task].kind,
                images,
                engine.autocast,
                self.attribution_map,
                self.attribution_layer,
                self.occlusion_cell,
            )
            maps.append(found.flatten(1).double().cpu())
        model.train(was_training)
        self.maps = torch.stack(maps).numpy()
        self.values["attribution"] = [attribution_similarity(self.maps)]
        self.steps["attribution"] = [engine.step]
        self.lr["attribution"] = [float("nan")]
        # an occlusion map passes the probe set forward once whole and once per occluded cell;
        # a gradient map once forward and once backward
        cells = (images.shape[-2] // self.occlusion_cell) * (images.shape[-1] // self.occlusion_cell)
        for task in tasks:
            occluded = occludes(self.attribution_map, engine.tasks[task].kind)
            self.cost["forward"] += cells + 1 if occluded else 1
            self.cost["backward"] += 0 if occluded else 1
        self.cost["seconds"] += time.perf_counter() - start

    # -- results ------------------------------------------------------------------------------
    def matrices(self) -> dict[str, np.ndarray]:
        """Each quantity averaged over the probes: (tasks, tasks), source rows."""
        return {name: np.nanmean(np.stack(v), axis=0) for name, v in self.values.items()}

    def trajectory(self, tasks: list[str]) -> list[dict[str, Any]]:
        """Long rows (quantity, step, lr, source, target, value) of every probe."""
        rows = []
        for name, mats in self.values.items():
            for step, lr, matrix in zip(self.steps[name], self.lr[name], mats, strict=True):
                for i, source in enumerate(tasks):
                    for j, target in enumerate(tasks):
                        rows.append(
                            {
                                "quantity": name,
                                "step": step,
                                "lr": lr,
                                "source": source,
                                "target": target,
                                "value": float(matrix[i, j]),
                            }
                        )
        return rows


def readout_similarity(profiles: np.ndarray) -> np.ndarray:
    """Cosine similarity of readout profiles (tasks, channels), each divided by its mean and
    centred by the mean profile over the tasks (what every head reads says nothing about a
    pair); a task whose head reads nothing (all zero) has NaN similarities."""
    profiles = np.asarray(profiles, dtype=float)
    scale = profiles.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = profiles / np.where(scale > 0, scale, np.nan)
        centred = relative - np.nanmean(relative, axis=0, keepdims=True)
        unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    return unit @ unit.T


def attribution_similarity(maps: np.ndarray) -> np.ndarray:
    """Mean over images of the cosine similarity of the tasks' attribution maps (tasks, images,
    tokens): each map divided by its sum and centred over its tokens, then centred by the mean
    map over the tasks on that image. An image on which every task's map is the same carries no
    pair information (NaN there, left out of the mean); a task whose head looks nowhere (all
    zero) has NaN similarities."""
    maps = np.asarray(maps, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = maps.sum(axis=2, keepdims=True)
        shares = maps / np.where(total > 0, total, np.nan)
        centred = shares - shares.mean(axis=2, keepdims=True)
        centred = centred - np.nanmean(centred, axis=0, keepdims=True)
        norms = np.linalg.norm(centred, axis=2, keepdims=True)
        unit = centred / np.where(norms > 1e-12, norms, np.nan)
        per_image = np.einsum("ink,jnk->nij", unit, unit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN pair stays NaN
        return np.nanmean(per_image, axis=0)
