"""Callbacks of the training loop: evaluation with best-per-task checkpoints, periodic
checkpoints, and the progress bar. Order matters: evaluation runs before the periodic checkpoint
of the same step, so a resumed run never misses or repeats an evaluation. Every file is written
atomically (:mod:`taskgroup.runtime`): a kill or a full disk leaves the previous version."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from taskgroup.runtime import atomic_write_bytes, atomic_write_text
from taskgroup.training.engine import Callback, Engine, StepOutput

log = logging.getLogger("taskgroup")

METRIC_FIELDS = ["network", "task", "step", "split", "metric", "value"]


class EvaluationCallback(Callback):
    """Evaluates every ``every`` steps and at the last step; appends tidy rows (network, task,
    step, split, metric, value) to ``metrics.csv``; keeps, per task, the best step on the task's
    primary *validation* metric and the weights of that step (one file per step that is best for
    at least one task, deleted when no task points to it any more; weights holding a NaN or an
    infinite value are never written: :class:`~taskgroup.training.engine.TrainingDiverged`).

    When the data has a held-out test split, every evaluation scores it too (rows with split
    "test"), so each task's test metrics at the step chosen on validation are known: ``best``
    then also holds ``test_value`` and ``test_metrics`` of that step. The test split never
    chooses anything (steps, networks, pruning: ``on_evaluate`` receives the validation scores)."""

    def __init__(self, every: int) -> None:
        self.every = every
        # task -> {"step", "value", "metrics"} (validation) [+ "test_value", "test_metrics"]
        self.best: dict[str, dict[str, Any]] = {}

    def metrics_file(self, engine: Engine) -> Path:
        return engine.out_dir / "metrics.csv"

    def best_dir(self, engine: Engine) -> Path:
        return engine.out_dir / "checkpoints" / "best"

    def on_train_start(self, engine: Engine) -> None:
        if not engine.dist.is_main:
            return
        file = self.metrics_file(engine)
        if file.exists():  # a resumed run: drop rows of steps after the checkpoint
            rows = pd.read_csv(file)
            atomic_write_text(file, rows[rows["step"] <= engine.step].to_csv(index=False))
        self.best_dir(engine).mkdir(parents=True, exist_ok=True)
        self._remove_unreferenced(engine)

    def on_step_end(self, engine: Engine, output: StepOutput) -> None:
        if output.step % self.every == 0 or output.step == engine.total_steps:
            self.evaluate(engine, output.step)

    def evaluate(self, engine: Engine, step: int) -> dict[str, dict[str, float]]:
        scores = engine.evaluate("val")
        splits = {"val": scores}
        if engine.data.test is not None:
            splits["test"] = engine.evaluate("test")
        if engine.dist.is_main:
            file = self.metrics_file(engine)
            text = io.StringIO()  # appended, the file replaced whole; "\n" as pandas writes
            # the file when a resume cuts it back to the checkpoint's step
            writer = csv.writer(text, lineterminator="\n")
            if not file.exists():
                writer.writerow(METRIC_FIELDS)
            for split, split_scores in splits.items():
                for task, values in split_scores.items():
                    for metric, value in values.items():
                        writer.writerow([engine.name, task, step, split, metric, value])
            old = file.read_bytes() if file.exists() else b""
            atomic_write_bytes(file, old + text.getvalue().encode("utf-8"))
        improved = {}
        for task, values in scores.items():
            primary = engine.tasks[task].primary_metric
            value = values[primary.name]
            old = self.best.get(task)
            better = old is None or (
                value > old["value"] if primary.higher_is_better else value < old["value"]
            )
            if better:
                improved[task] = {"step": step, "value": value, "metrics": values}
                if "test" in splits:  # reported beside the choice, never part of it
                    test = splits["test"][task]
                    improved[task].update(test_value=test[primary.name], test_metrics=test)
        if improved:  # every rank (they score alike): weights that are not finite stop them all
            engine.save_checked(engine.model.state_dict(), self.best_dir(engine) / f"step_{step}.pt", step)
            self.best.update(improved)
            if engine.dist.is_main:
                self._remove_unreferenced(engine)
        log.info(
            "network %s step %d: %s",
            engine.name,
            step,
            ", ".join(
                f"{t} {engine.tasks[t].primary_metric.name}={v[engine.tasks[t].primary_metric.name]:.4f}"
                for t, v in scores.items()
            ),
        )
        for c in engine.callbacks:
            c.on_evaluate(engine, step, scores)
        return scores

    def _remove_unreferenced(self, engine: Engine) -> None:
        keep = {f"step_{b['step']}.pt" for b in self.best.values()}
        for file in self.best_dir(engine).glob("step_*.pt"):
            if file.name not in keep:
                file.unlink()

    def on_train_end(self, engine: Engine) -> None:
        if engine.dist.is_main:
            atomic_write_text(engine.out_dir / "best.json", json.dumps(self.best, indent=1))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = dict(state.get("best", {}))


class CheckpointCallback(Callback):
    """Saves the whole state every ``every`` steps and at the end."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_step_end(self, engine: Engine, output: StepOutput) -> None:
        if output.step % self.every == 0:
            engine.save_checkpoint()

    def on_train_end(self, engine: Engine) -> None:
        engine.save_checkpoint()


class ProgressCallback(Callback):
    """A rich progress bar: network, step, the loss of each task (moving average), ETA."""

    def __init__(self, progress: Progress | None = None, shown: int = 4) -> None:
        self.progress = progress
        self.shown = shown
        self.ema: dict[str, float] = {}
        self._bar = None
        self._own = progress is None

    @staticmethod
    def make_progress(console=None) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[losses]}"),
            TimeRemainingColumn(),
            console=console,
        )

    def on_train_start(self, engine: Engine) -> None:
        if not engine.dist.is_main:
            return
        if self.progress is None:
            self.progress = self.make_progress()
            self.progress.start()
        self._bar = self.progress.add_task(
            engine.name, total=engine.total_steps, completed=engine.step, losses=""
        )

    def on_step_end(self, engine: Engine, output: StepOutput) -> None:
        if self._bar is None:
            return
        for task, loss in output.losses.items():
            self.ema[task] = loss if task not in self.ema else 0.9 * self.ema[task] + 0.1 * loss
        worst = sorted(self.ema.items(), key=lambda kv: -kv[1])[: self.shown]
        text = " ".join(f"{t[:14]} {v:.3f}" for t, v in worst)
        if len(self.ema) > self.shown:
            text += f" (+{len(self.ema) - self.shown})"
        assert self.progress is not None
        self.progress.update(self._bar, completed=output.step, losses=text)

    def on_train_end(self, engine: Engine) -> None:
        if self.progress is not None and self._bar is not None:
            self.progress.update(self._bar, completed=engine.total_steps)
            if self._own:
                self.progress.stop()
