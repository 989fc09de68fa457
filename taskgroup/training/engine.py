"""THE training loop: one network on any set of tasks, for every paradigm and affinity method.

Each step draws one task's batch with the multi-task sampler (uniform, proportional or
temperature), computes ``lambda_t L_t`` plus the MoE auxiliary loss, and takes an AdamW step
(separate learning rates for the pretrained encoder and the new weights, cosine schedule with
warm-up, gradient clipping; bfloat16 autocast and channels-last on CUDA). Everything else is a
callback (:mod:`taskgroup.training.callbacks`): evaluation and best-per-task checkpoints,
periodic checkpoints, progress display, affinity probes, Optuna pruning.

A run survives being killed: the state saved every ``checkpoint_every`` steps (model, optimiser,
schedule, sampler, random generators, callbacks) makes the resumed run take the very same steps
as one never interrupted. Checkpoints hold tensors and plain containers only and are read with
``weights_only=True`` (:func:`taskgroup.runtime.load_state`), so a planted file cannot run code.

A non-finite loss, or a non-finite gradient norm (found before the optimiser applies it), stops
the run: the state at the start of the failing step (weights before its update, sampler and
random generators before its draw) is saved as the last checkpoint, the failure goes to the log,
and the message says how to go on with lower learning rates: in a run folder of ``taskgroup
train`` (``resumable``) by resuming from that state with ``--resume-with-changes`` (a resumed
run takes the configured learning rates over the checkpoint's); elsewhere (affinity probes,
compare and affinity workers, the pretext run) by rerunning with other rates, whose networks
live in another folder (its name hashes the rates) and start afresh. No checkpoint (last or
best) is ever written with a non-finite tensor.

Under several processes every such decision is taken by all ranks together: a loss that is not
finite on one rank's shard stops every rank at the same step, and a checkpoint that rank 0
refuses or fails to write makes every rank raise, instead of leaving the others waiting at the
next collective.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from taskgroup.config import DataConfig, TrainConfig
from taskgroup.data import Batch, MultiTaskBatchSampler
from taskgroup.data.fmuia import record_target
from taskgroup.errors import TaskgroupError
from taskgroup.kinds import decode_outputs, kind_entry
from taskgroup.models import M2DINO
from taskgroup.runtime import WriteError, load_state, non_finite, remove_temporaries, save_state
from taskgroup.tasks import TaskSpec
from taskgroup.training import augment
from taskgroup.training.data import TrainingData
from taskgroup.training.distributed import DistInfo

log = logging.getLogger("taskgroup")


class TrainingDiverged(TaskgroupError):
    """A loss or a gradient became NaN or infinite (or a state to save holds such a value)."""

    def __init__(self, message: str, step: int, task: str | None = None, quantity: str = "loss") -> None:
        super().__init__(message)
        self.step = step
        self.task = task
        self.quantity = quantity  # "loss", "gradient norm" or "state"


#: what rank 0 tells the other ranks of a checkpoint it was to write (see ``Engine.save_checked``)
_SAVED, _NOT_FINITE, _NOT_WRITTEN = 0, 1, 2


@dataclasses.dataclass
class StepOutput:
    """What one step did: the batches it used and each task's (unweighted) loss."""

    step: int
    batches: dict[str, Batch]
    losses: dict[str, float]
    total: float


class Callback:
    """Hooks of the loop. State returned by ``state_dict`` is checkpointed with the run."""

    def on_train_start(self, engine: Engine) -> None: ...

    def on_step_end(self, engine: Engine, output: StepOutput) -> None: ...

    def on_evaluate(self, engine: Engine, step: int, scores: dict[str, dict[str, float]]) -> None: ...

    def on_train_end(self, engine: Engine) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def build_optimiser(model: M2DINO, cfg: TrainConfig, total_steps: int):
    """AdamW with encoder / new-weight learning rates and a warm-up + cosine schedule."""
    groups = model.parameter_groups()
    param_groups = [
        {"params": groups["encoder"], "lr": cfg.lr_encoder, "name": "encoder"},
        {"params": groups["new"], "lr": cfg.lr_heads, "name": "new"},
    ]
    optimiser = torch.optim.AdamW([g for g in param_groups if g["params"]], weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimiser, torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


class Engine:
    """Trains one network (a model on a set of tasks) and evaluates it with the official metrics."""

    def __init__(
        self,
        model: M2DINO,
        data: TrainingData,
        tasks: Sequence[TaskSpec],
        train_cfg: TrainConfig,
        data_cfg: DataConfig,
        out_dir: Path,
        name: str,
        callbacks: Sequence[Callback] = (),
        device: torch.device | None = None,
        dist_info: DistInfo | None = None,
        resumable: bool = False,
    ) -> None:
        self.dist = dist_info or DistInfo()
        # whether a divergence is resumed from its saved state with --resume-with-changes (a run
        # folder of ``taskgroup train``), or by rerunning with other rates into a new folder
        self.resumable = resumable
        self.model = model
        self.data = data
        self.tasks = {t.id: t for t in tasks}
        self.cfg = train_cfg
        self.data_cfg = data_cfg
        self.out_dir = Path(out_dir)
        self.name = name
        self.callbacks = list(callbacks)
        self.device = device or torch.device("cpu")
        self.total_steps = train_cfg.total_steps(len(tasks))
        self.step = 0
        self.saved_step: int | None = None  # the step of the last checkpoint written or read
        # sampler and random generators at the start of the current step (what a divergence saves)
        self._step_start: dict[str, Any] = {}
        self.model.to(self.device)
        # the module that is called in training: DDP-wrapped when several processes train
        self.network: nn.Module = model
        if self.dist.enabled:
            self.network = DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        self.optimiser, self.scheduler = build_optimiser(model, train_cfg, self.total_steps)
        self._batches: Iterator[Batch] | None = None  # the loader's batches (data.workers > 0)
        self.sampler = MultiTaskBatchSampler(
            {t: data.train.size(t) for t in self.tasks},
            data_cfg.batch_size,
            data_cfg.sampler,
            data_cfg.temperature,
            seed=train_cfg.seed,
        )
        self._ground_truth: dict[str, list] = {}
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)

    # -- checkpoints ------------------------------------------------------------------------
    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.pt"

    def _draw_state(self) -> dict[str, Any]:
        """What drawing a step's batch and running it advance: the sampler and the generators."""
        return {
            "sampler": self.sampler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **self._draw_state(),
            "callbacks": {type(c).__name__: c.state_dict() for c in self.callbacks},
        }

    def save_checkpoint(self, path: Path | None = None, state: dict[str, Any] | None = None) -> Path:
        """Write the whole state (``state``, default the current one) atomically: a kill or a full
        disk mid-write leaves the previous file. A state with a non-finite tensor is never
        written (:class:`TrainingDiverged`, the previous file kept). Only rank 0 writes, the
        others wait for it (see :meth:`save_checked`)."""
        path = path or self.last_checkpoint
        state = state if state is not None else self.state_dict()
        self.save_checked(state, path, int(state["step"]), {k: state[k] for k in ("model", "optimiser")})
        if path == self.last_checkpoint:
            self.saved_step = int(state["step"])
        return path

    def save_checked(self, state: Any, path: Path, step: int, checked: Any = None) -> None:
        """Write ``state`` to ``path`` on rank 0 unless ``checked`` (default ``state``) holds a
        non-finite tensor: then :class:`TrainingDiverged` (nothing written, the previous file
        kept). Every rank calls it: under several processes rank 0 tells the others whether the
        file was written, and all raise together when it was not (a :class:`TrainingDiverged`,
        or on the others a :class:`WriteError` for rank 0's failed write), so none is left
        waiting for the others; in one process an error is raised as it comes."""
        if not self.dist.enabled:
            self._write_state(state, path, step, checked)
            return
        error: BaseException | None = None
        outcome = _SAVED
        if self.dist.is_main:
            try:
                self._write_state(state, path, step, checked)
            except TrainingDiverged as exc:
                error, outcome = exc, _NOT_FINITE
            except Exception as exc:
                error, outcome = exc, _NOT_WRITTEN
        outcome = self._reduce_max(outcome)  # also the barrier: the file is written when it returns
        if error is not None:
            raise error
        if outcome == _NOT_FINITE:
            raise TrainingDiverged(
                f"network {self.name}: rank 0 did not save {path} at step {step}: tensors are not "
                f"finite; {self._kept()}",
                step=step,
                quantity="state",
            )
        if outcome == _NOT_WRITTEN:
            raise WriteError(f"network {self.name}: rank 0 could not write {path} at step {step}")

    def _write_state(self, state: Any, path: Path, step: int, checked: Any) -> None:
        bad = non_finite(state if checked is None else checked)
        if bad:
            raise TrainingDiverged(
                f"network {self.name}: not saving {path} at step {step}: {len(bad)} tensor(s) are "
                f"not finite ({', '.join(bad[:3])}); {self._kept()}. {self.advice()}",
                step=step,
                quantity="state",
            )
        save_state(state, path)

    def _reduce_max(self, value: int) -> int:
        """The largest of every rank's ``value`` (a collective: every rank calls it)."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        return int(tensor.item())

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank, the same answer on every rank (one process:
        ``flag``)."""
        return self._reduce_max(int(flag)) > 0 if self.dist.enabled else flag

    def _kept(self) -> str:
        last = self.last_checkpoint
        if self.saved_step is None or not last.exists():
            return "no checkpoint of this network was written before"
        return f"{last} keeps the state of step {self.saved_step}"

    def advice(self) -> str:
        """How to go on after a divergence with learning rates ten times lower (see the module
        doc: a run folder resumes from the saved state, other networks start afresh)."""
        lr_encoder, lr_heads = self.cfg.lr_encoder / 10, self.cfg.lr_heads / 10
        rates = f"--set train.lr_encoder={lr_encoder:g} --set train.lr_heads={lr_heads:g}"
        if self.resumable:
            return (
                f"To resume from it with lower learning rates, run the same command again with "
                f"--resume-with-changes {rates} (other values work too; the change is recorded in "
                "the run's config_history.yaml)"
            )
        return (
            f"To train with lower learning rates, run the same command again with {rates} (other "
            "values work too): this network's folder is named by a hash of its config, rates "
            "included, so the new rates train a new network from the start (only a run folder of "
            "`taskgroup train` resumes a diverged network, with --resume-with-changes)"
        )

    def load_checkpoint(self, path: Path) -> None:
        state = load_state(path, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        for c in self.callbacks:
            c.load_state_dict(state["callbacks"].get(type(c).__name__, {}))
        self.step = int(state["step"])
        self.saved_step = self.step
        self._take_configured_learning_rates()

    def _take_configured_learning_rates(self) -> None:
        """After a resume: the configured learning rates over the checkpoint's, at the same point
        of the schedule (the recovery from a divergence resumes with lower ones); nothing changes
        when they are the checkpoint's, so a plain resume stays exact."""
        configured = {"encoder": self.cfg.lr_encoder, "new": self.cfg.lr_heads}
        changed = []
        for i, group in enumerate(self.optimiser.param_groups):
            old, new = self.scheduler.base_lrs[i], configured[group["name"]]
            if old == new:
                continue
            self.scheduler.base_lrs[i] = group["initial_lr"] = new
            group["lr"] = new * self.scheduler.lr_lambdas[i](self.scheduler.last_epoch)
            changed.append(f"{group['name']} {old:g} -> {new:g}")
        if changed:
            self.scheduler._last_lr = [g["lr"] for g in self.optimiser.param_groups]
            log.info(
                "network %s: learning rates changed at step %d: %s", self.name, self.step, ", ".join(changed)
            )

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, split: str = "val") -> dict[str, dict[str, float]]:
        """Official metrics per task on a split ("val", "test" or "train"), at original resolution.
        Under DDP the main rank alone evaluates (the weights are the same on every rank; the
        Hausdorff distances at original resolution are the dear part) and sends the scores to
        the others, which wait: every rank then chooses the same best steps."""
        if not self.dist.enabled:
            return self._evaluate(split)
        # in-process communication of a dict of floats between the ranks of one run, not a file
        box: list[Any] = [None]
        error: BaseException | None = None
        if self.dist.is_main:
            try:
                box = [self._evaluate(split)]
            except Exception as exc:  # the other ranks must not wait for scores that never come
                error, box = exc, [f"evaluation failed on rank 0: {type(exc).__name__}: {exc}"]
        torch_dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if isinstance(box[0], str):
            raise TaskgroupError(box[0])
        return box[0]

    @torch.no_grad()
    def _evaluate(self, split: str) -> dict[str, dict[str, float]]:
        data = self.data.split(split)
        was_training = self.model.training
        self.model.eval()
        scores: dict[str, dict[str, float]] = {}
        for task, spec in self.tasks.items():
            key = f"{split}/{task}"
            if key not in self._ground_truth:
                self._ground_truth[key] = [record_target(r) for r in data.records(task)]
            truth = self._ground_truth[key]
            kind = kind_entry(spec)
            metric = kind.metric(spec)
            n = data.size(task)
            for start in range(0, n, self.data_cfg.batch_size):
                positions = list(range(start, min(n, start + self.data_cfg.batch_size)))
                batch = data.batch(task, positions).to(self.device)
                with self.autocast():
                    output = self.model(self.images(batch), task)
                for pred, pos in zip(
                    decode_outputs(spec, output, batch, data.records(task)), positions, strict=True
                ):
                    kind.update(metric, pred, truth[pos])
            scores[task] = metric.aggregate()
        self.model.train(was_training)
        return scores

    # -- the loop ---------------------------------------------------------------------------
    def autocast(self):
        """The mixed-precision context of a forward pass: bfloat16 on CUDA when ``train.amp``,
        none on the CPU (callbacks that run the model use it too)."""
        enabled = self.cfg.amp and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def images(self, batch: Batch) -> torch.Tensor:
        """A batch's images as the model takes them (channels-last on CUDA when asked)."""
        if self.cfg.channels_last and self.device.type == "cuda":
            return batch.images.contiguous(memory_format=torch.channels_last)
        return batch.images

    def loss(self, task: str, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The (unweighted) loss of ``task``'s head output on its batch."""
        spec = self.tasks[task]
        return kind_entry(spec).loss(output.float(), batch.targets, self.data_cfg.image_size)

    def next_batch(self) -> Batch:
        task, positions = self.sampler.next_batch()
        if self.dist.enabled:  # every rank drew the same batch: take this rank's shard
            positions = positions[self.dist.rank :: self.dist.world]
        if self._batches is not None:  # built ahead by the loader's workers from the same plan
            batch = next(self._batches)
            if batch.task_id != task or batch.indices.tolist() != list(positions):
                raise RuntimeError(
                    f"network {self.name}: the loader's batch is not step {self.step + 1}'s plan"
                )
        else:
            batch = self.data.train.batch(task, positions)
        if self.data_cfg.augment == "hflip":
            rank = self.dist.rank if self.dist.enabled else 0
            flip = augment.flips(self.cfg.seed, self.step + 1, rank, len(positions))
            batch = augment.hflip(batch, self.tasks[task], flip, self.data_cfg.image_size)
        return batch.to(self.device, non_blocking=True)

    def start_loader(self) -> None:
        """DataLoader workers (``data.workers``) for the steps left, from the sampler's state now."""
        self._batches = None
        if self.data_cfg.workers > 0 and self.step < self.total_steps:
            from taskgroup.training.loader import batch_iterator

            world = self.dist.world if self.dist.enabled else 1
            self._batches = batch_iterator(
                self.data.train,
                self.sampler,
                self.total_steps - self.step,
                self.data_cfg.workers,
                pin_memory=self.device.type == "cuda",
                rank=self.dist.rank if self.dist.enabled else 0,
                world=world,
            )

    def probe_batch(self, task: str, salt: int = 0, size: int | None = None) -> Batch:
        """A batch of ``task`` (``size`` images, default the batch size) for probes (affinity
        measurement), drawn from its own generator seeded by (seed, step, task, salt) so the
        training sequence is left as it is."""
        index = list(self.tasks).index(task)
        rng = np.random.default_rng([self.cfg.seed, 7, self.step, index, salt])
        available = self.data.train.size(task)
        wanted = size or self.data_cfg.batch_size
        positions = rng.choice(available, min(available, wanted), replace=False).tolist()
        if self.dist.enabled:
            positions = positions[self.dist.rank :: self.dist.world]
        return self.data.train.batch(task, positions).to(self.device)

    def train_step(self) -> StepOutput:
        """One optimiser step on one task's batch; a non-finite loss or gradient norm stops the
        run before the update (see :meth:`diverged`)."""
        self._step_start = self._draw_state()
        batch = self.next_batch()
        task = batch.task_id
        with self.autocast():
            loss = self.loss(task, self.network(self.images(batch), task), batch)
            total = self.cfg.loss_weights.get(task, 1.0) * loss + self.model.aux_loss()
        finite = bool(torch.isfinite(total))
        if self._any_rank(not finite):  # every rank stops, not only the one whose shard diverged
            self.diverged(task, "loss", total.item() if not finite else "not finite on another rank")
        self.optimiser.zero_grad(set_to_none=True)
        total.backward()
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        # the norm clip_grad_norm_ computes, taken first: a NaN in it would reach every weight
        norm = nn.utils.get_total_norm([p.grad for p in parameters])
        if not torch.isfinite(norm):
            self.diverged(task, "gradient norm", norm.item())
        if self.cfg.grad_clip:
            nn.utils.clip_grads_with_norm_(parameters, self.cfg.grad_clip, norm)
        self.optimiser.step()
        self.scheduler.step()
        self.step += 1
        return StepOutput(self.step, {task: batch}, {task: float(loss.detach())}, float(total.detach()))

    def diverged(self, task: str, quantity: str, value: float | str) -> None:
        """Save the state at the start of this step (the weights before its update) as the last
        checkpoint, log the failure and raise :class:`TrainingDiverged` saying how to resume."""
        step = self.step
        state = {**self.state_dict(), **self._step_start}
        what = f"network {self.name}: the {quantity} of task {task} is {value} at step {step}"
        try:
            path = self.save_checkpoint(state=state)
            where = f"the last good state is saved in {path} (step {step}, before the update of this step)"
        except TrainingDiverged:  # the weights were no longer finite: the previous file stays
            where = f"the weights are no longer finite: {self._kept()}"
        message = f"{what}; {where}. {self.advice()}"
        log.error(message)
        raise TrainingDiverged(message, step=step, task=task, quantity=quantity)

    def run(self) -> None:
        """Train to ``total_steps`` (resuming from the last checkpoint if there is one)."""
        self.model.train()
        if self.dist.is_main:  # left by a process killed mid-write
            for folder in (self.out_dir, self.checkpoint_dir, self.checkpoint_dir / "best"):
                remove_temporaries(folder)
        if self.last_checkpoint.exists():
            self.load_checkpoint(self.last_checkpoint)
            log.info("network %s: resumed at step %d from %s", self.name, self.step, self.last_checkpoint)
        for c in self.callbacks:
            c.on_train_start(self)
        self.start_loader()
        try:
            while self.step < self.total_steps:
                output = self.train_step()
                for c in self.callbacks:
                    c.on_step_end(self, output)
        finally:
            self._batches = None  # the loader's workers end with their iterator
        for c in self.callbacks:
            c.on_train_end(self)
