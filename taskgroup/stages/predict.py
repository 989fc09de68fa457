"""``taskgroup predict``: a trained run's submission folder (the challenge's format).

    taskgroup predict RUN [--data ROOT] [--split val|test] --out DIR

``RUN`` is a ``taskgroup train`` folder: its ``config.yaml`` (data, model), ``grouping.yaml``
and ``served.csv`` (each task's serving network and the step chosen on validation). Every task
is predicted by the network that serves it, with the weights of that step
(``networks/<name>/checkpoints/best/step_<step>.pt``, kept by the training's evaluation), on the
images of ``--split`` of ``--data`` (default: the run's own data), prepared exactly as the
training evaluated them (same resizing and batches), so ``taskgroup evaluate`` on the folder
gives the scores recorded in ``served.csv`` (a test holds this). Segmentation masks are written
as PNG at the original size under the ground truth's relative paths, the other kinds to
``classification_predictions.json``, ``detection_predictions.json`` and
``regression_predictions.json`` (:func:`taskgroup.data.submission.write_predictions`).

The folder is written whole into a temporary sibling and renamed into place: an existing
``--out`` is never overwritten, and a stopped prediction leaves nothing half written.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console

from taskgroup.config import load_run_config
from taskgroup.data.submission import Prediction, write_predictions
from taskgroup.errors import ConfigError
from taskgroup.groupings import load_grouping
from taskgroup.kinds import decode_outputs
from taskgroup.models import build_model
from taskgroup.runtime import load_state, pick_device
from taskgroup.tasks import TaskRegistry, load_registry
from taskgroup.training.data import prepare_data
from taskgroup.training.run import safe_name

__all__ = ["predict_run"]


@dataclasses.dataclass(frozen=True)
class PredictResult:
    out: Path
    split: str
    counts: dict[str, int]  # task -> images predicted
    served: pd.DataFrame  # the run's served.csv: which network and step predicted each task


def _read_run(run_dir: Path, registry: TaskRegistry | None):
    missing = [f for f in ("config.yaml", "grouping.yaml", "served.csv") if not (run_dir / f).is_file()]
    if missing:
        raise ConfigError(
            f"{run_dir}: not a finished `taskgroup train` folder (no {', '.join(missing)}); "
            "train it first, or give the run folder itself"
        )
    cfg = load_run_config(run_dir / "config.yaml")
    registry = registry or load_registry(cfg.registry)
    grouping = load_grouping(run_dir / "grouping.yaml", registry)
    served = pd.read_csv(run_dir / "served.csv", dtype={"network": str, "task": str})
    return cfg, registry, grouping, served


def predict_run(
    run_dir: str | Path,
    out_dir: str | Path,
    data_root: str | Path | None = None,
    split: str = "val",
    registry: TaskRegistry | None = None,
    device: str = "auto",
    console: Console | None = None,
) -> PredictResult:
    """Write the submission folder of ``run_dir``'s served networks on ``split`` (see the
    module doc)."""
    run_dir, out = Path(run_dir), Path(out_dir)
    console = console or Console()
    if split not in ("val", "test"):
        raise ConfigError(f"--split {split!r}: expected val or test")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"{out}: exists and is not an empty folder; predictions are never written over anything"
        )
    cfg, registry, grouping, served = _read_run(run_dir, registry)
    data_cfg = cfg.data if data_root is None else dataclasses.replace(cfg.data, root=str(data_root))
    tasks = list(served["task"])
    # decoded batch by batch (the same resizing as preloading): the training split is never read
    data = prepare_data(dataclasses.replace(data_cfg, preload=False), registry, tasks)
    if split == "test" and data.test is None:
        raise ConfigError(f"{data.root}: no test split (a test/ folder or data.test_root) to predict")
    images = data.split(split)
    console.print(
        f"predicting {len(tasks)} task(s) on {split} of {data.root}", highlight=False, soft_wrap=True
    )
    # the checkpoints hold every weight: the backbone's pretrained file is not read again
    backbone = dataclasses.replace(cfg.model.backbone, pretrained=None)
    model_cfg = dataclasses.replace(cfg.model, backbone=backbone)
    torch_device = pick_device(device)
    on_cuda = torch_device.type == "cuda"

    def autocast():
        return torch.autocast(
            device_type=torch_device.type, dtype=torch.bfloat16, enabled=cfg.train.amp and on_cuda
        )

    def engine_images(images: torch.Tensor) -> torch.Tensor:
        if cfg.train.channels_last and on_cuda:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    predictions: list[Prediction] = []
    counts: dict[str, int] = {}
    for (network, step), rows in served.groupby(["network", "step"], sort=False):
        name = str(network)
        if name not in grouping.groups:
            raise ConfigError(f"{run_dir / 'served.csv'}: network {name!r} is not in grouping.yaml")
        checkpoint = run_dir / "networks" / safe_name(name) / "checkpoints" / "best" / f"step_{int(step)}.pt"
        if not checkpoint.is_file():
            raise ConfigError(
                f"{checkpoint}: missing; the weights of network {name!r} at step {int(step)}, where "
                f"it serves {', '.join(rows['task'])}, are needed to predict"
            )
        specs = [registry[t] for t in grouping.groups[name]]
        model = build_model(model_cfg, specs)
        model.load_state_dict(load_state(checkpoint, map_location="cpu"))
        model.to(torch_device).eval()
        for task in rows["task"]:
            spec = registry[task]
            records = images.records(task)
            with torch.no_grad():
                for start in range(0, len(records), data_cfg.batch_size):
                    positions = list(range(start, min(len(records), start + data_cfg.batch_size)))
                    batch = images.batch(task, positions).to(torch_device)
                    with autocast():  # as the training's evaluation ran it (bf16 on CUDA with train.amp)
                        output = model(engine_images(batch.images), task)
                    predictions.extend(decode_outputs(spec, output, batch, records))
            counts[task] = len(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_predictions(staging, predictions)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PredictResult(out, split, counts, served)
