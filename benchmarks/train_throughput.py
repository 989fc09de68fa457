"""Throughput of AU training, and the share of step time spent waiting for data.

    python benchmarks/train_throughput.py [--config configs/tiny.yaml] [--steps 300] [--workers 0 2]
    python benchmarks/train_throughput.py --config configs/full.yaml --steps 12 --workers 0 2 [--data ROOT]

Measured in one run: an Engine on all 27 tasks of the synthetic benchmark (as `taskgroup train
--grouping au` builds it) takes ``--steps`` steps with preloaded data (the default), then with
decoding on the fly (``data.preload=false``) once per ``--workers`` value (``data.workers``:
DataLoader worker processes building the batches ahead); for each, images/s and the share of
wall time the step waited for its batch (target, issue 4: under 10 %). With ``configs/full.yaml``
the model is the real ViT-S/16 at 224 px (random weights: throughput does not depend on them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from report import au_engine, report

from taskgroup.config import load_run_config
from taskgroup.runtime import configure_cpu
from taskgroup.tasks import load_registry
from taskgroup.training import prepare_data


def measure(config: Path, preload: bool, steps: int, workers: int = 0, data_root: Path | None = None) -> dict:
    # throughput does not depend on the weights: a random encoder, no pretraining
    overrides = [
        f"data.preload={str(preload).lower()}",
        f"data.workers={workers}",
        "model.backbone.pretrained=none",
    ]
    overrides += [f"data.root={data_root}"] if data_root is not None else []
    cfg = load_run_config(config, overrides)
    configure_cpu(cfg.train.threads)
    registry = load_registry(cfg.registry)
    t0 = time.perf_counter()
    data = prepare_data(cfg.data, registry, registry.ids)
    prepare = time.perf_counter() - t0
    warm = min(10, steps)
    with au_engine(cfg, registry, data) as engine:
        spent = 0.0
        original = engine.next_batch

        def timed_next_batch():
            nonlocal spent
            start = time.perf_counter()
            batch = original()
            spent += time.perf_counter() - start
            return batch

        engine.next_batch = timed_next_batch  # type: ignore[method-assign]
        engine.total_steps = engine.step + warm + steps  # the loader plans exactly these steps
        engine.start_loader()
        cuda = engine.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(engine.device)
        for _ in range(warm):
            engine.train_step()
        spent = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            engine.train_step()
        wall = time.perf_counter() - start
        engine._batches = None  # the loader's workers end here
        peak = torch.cuda.max_memory_allocated(engine.device) / 2**30 if cuda else None
        device = str(engine.device)
    return {
        "device": device,
        **({"peak_gpu_memory_gib": round(peak, 2)} if peak is not None else {}),
        "preload": preload,
        "loader_workers": workers,
        "image_size": cfg.data.image_size,
        "prepare_s": round(prepare, 1),
        "steps": steps,
        "images_per_s": round(steps * cfg.data.batch_size / wall, 1),
        "steps_per_s": round(steps / wall, 2),
        "data_share_percent": round(100 * spent / wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=Path("configs/tiny.yaml"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--data", type=Path, default=None, help="an FM_UIA root (default: the synthetic benchmark)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = [measure(args.config, True, args.steps, data_root=args.data)]
    rows += [measure(args.config, False, max(1, args.steps // 3), w, args.data) for w in args.workers]
    report(f"AU training, {args.config.name}, 27 tasks", rows, args.json)


if __name__ == "__main__":
    main()
