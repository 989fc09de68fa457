"""Where each trained head looks: attribution mass on each planted structure of the synthetic benchmark.

    python benchmarks/attribution_focus.py RUN [--tasks T ...] [--images 16] [--layer features|input]
        [--map gradient|occlusion|hybrid] [--json OUT]

RUN is a `taskgroup affinity` folder whose probe trainings kept their checkpoints
(`probe_run*/checkpoints/last.pt`, e.g. `--method readout attribution`). For every probe
training, every task's head is read as the `attribution` estimator reads it
(`taskgroup.affinity.probes.attribution_maps`: the label-free head score's `sum_c |F_c *
ds/dF_c|` per token of the shared feature map, or of the patch embeddings with `--layer input`
(default: the run's `affinity.attribution_layer`), or with `--map occlusion` the change of the
head's output when each cell of the image is blanked (`occlusion_maps`, the run's
`affinity.occlusion_cell`), or with `--map hybrid` occlusion for the classification heads only
(`head_map`; default: the run's `affinity.attribution_map`), each map divided by its sum) on images of
three segmentation tasks whose masks mark one planted structure each (breast_lesion: the blob,
thyroid_nodule: the texture patch, lung: the lines). Reported per task and structure: the map's
mass inside the structure's mask divided by the mask's share of the image (1 = no preference, as
a uniform map), averaged over the images and the probe trainings. A head whose map sits on its
own structure shows a high value there; a map spread over the image shows values near 1
everywhere, and then the attribution similarity of that task rests on small differences.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from report import fail, report

from taskgroup.affinity.probes import ATTRIBUTION_MAPS, head_map
from taskgroup.config import load_run_config
from taskgroup.data.synthetic import TASK_FACTORS
from taskgroup.models import build_model
from taskgroup.runtime import configure_cpu, pick_device
from taskgroup.tasks import load_registry
from taskgroup.training import prepare_data
from taskgroup.training.pretrain import resolve_pretrained

#: one segmentation task per planted structure: its masks mark where the structure is
MARKERS = {"blob": "breast_lesion", "texture": "thyroid_nodule", "lines": "lung"}


def focus(
    run: Path, tasks: list[str] | None, images: int, layer: str | None = None, kind: str | None = None
) -> list[dict]:
    cfg = resolve_pretrained(load_run_config(run / "config.yaml"))
    layer = layer or cfg.affinity.attribution_layer
    kind = kind or cfg.affinity.attribution_map
    cell = cfg.affinity.occlusion_cell
    registry = load_registry(cfg.registry)
    all_tasks = list(registry.ids)
    shown = tasks or all_tasks
    unknown = [t for t in shown if t not in TASK_FACTORS]
    if unknown:
        fail(f"{', '.join(unknown)}: not a task of the synthetic benchmark")
    checkpoints = sorted(glob.glob(str(run / "probe_run*" / "checkpoints" / "last.pt")))
    if not checkpoints:
        fail(f"{run}: no probe_run*/checkpoints/last.pt (not a probe-training affinity run)")
    specs = [registry[t] for t in all_tasks]
    data = prepare_data(cfg.data, registry, all_tasks)
    device = pick_device()
    rng = np.random.default_rng(0)
    marker_batches = {}
    for structure, task in MARKERS.items():
        positions = rng.choice(data.train.size(task), images, replace=False).tolist()
        marker_batches[structure] = data.train.batch(task, positions).to(device)
    values = {(t, s): [] for t in shown for s in MARKERS}
    for checkpoint in checkpoints:
        model = build_model(cfg.model, specs)
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])
        model.to(device).eval()
        for structure, batch in marker_batches.items():
            mask = (batch.targets > 0).float()[:, None]
            for task in shown:
                maps = head_map(
                    model, task, registry[task].kind, batch.images, how=kind, layer=layer, cell=cell
                )
                maps = maps / maps.sum(dim=(1, 2), keepdim=True)
                share = F.adaptive_avg_pool2d(mask, maps.shape[-2:])[:, 0]
                inside = (maps * share).sum(dim=(1, 2)) / share.mean(dim=(1, 2)).clamp_min(1e-6)
                values[(task, structure)].append(float(inside.mean()))
    rows = []
    for task in shown:
        row = {"task": task, "type": registry[task].kind.short, "own structure": TASK_FACTORS[task].structure}
        for structure in MARKERS:
            row[f"on {structure}"] = round(float(np.mean(values[(task, structure)])), 2)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--images", type=int, default=16, help="images of each marker task")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--layer",
        choices=["features", "input"],
        default=None,
        help="default: the run's affinity.attribution_layer",
    )
    parser.add_argument(
        "--map",
        choices=list(ATTRIBUTION_MAPS),
        default=None,
        help="default: the run's affinity.attribution_map",
    )
    args = parser.parse_args()
    configure_cpu()
    rows = focus(args.run, args.tasks, args.images, args.layer, args.map)
    title = (
        "attribution mass per unit area on each planted structure "
        f"({args.run}, {args.map or 'run'} map, {args.layer or 'run'} layer)"
    )
    report(title, rows, args.json)


if __name__ == "__main__":
    main()
