"""Training-step cost of task-conditioned MoE against the dense model of the same width.

    python benchmarks/moe_step.py [--config configs/model_tiny.yaml] [--batch 32] [--steps 30]

Measured in one run, on the device chosen at run time (CPU here): the median time of a training
step (forward, backward, AdamW) of the dense ViT and of M2DINO with MoE (task routing, then token
routing), steps interleaved so that drift of the machine hits every variant alike; the FLOP ratio
of the same steps (torch's FlopCounterMode: only the active experts run, so it counts them); and
peak memory (CUDA: max allocated; CPU: growth of the peak RSS of a fresh process per variant
over building the model and 5 steps).
Target (issue 3): time ratio <= 1.15 x FLOP ratio with task-only routing.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
import time
from pathlib import Path

import torch
from report import report
from torch.utils.flop_counter import FlopCounterMode

from taskgroup.config import ModelConfig, from_mapping, load_yaml
from taskgroup.losses import task_loss
from taskgroup.models import build_model
from taskgroup.runtime import configure_cpu, pick_device
from taskgroup.tasks import load_registry

TASKS = ("breast_3cls", "lung", "IUGC")  # the stepped task is the first (a light head)
VARIANTS = {"dense": "dense", "moe_task": "task", "moe_token": "moe"}


def make(config: Path, variant: str, device: torch.device):
    cfg = from_mapping(ModelConfig, load_yaml(config), str(config))
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, mode=VARIANTS[variant]))
    registry = load_registry()
    torch.manual_seed(0)
    model = build_model(cfg, [registry[t] for t in TASKS]).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    spec = registry[TASKS[0]]
    return model, optimiser, spec


def step(model, optimiser, spec, images, target) -> None:
    loss = task_loss(spec, model(images, spec.id), target, images.shape[-1]) + model.aux_loss()
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()


def inputs(model, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    size = model.image_size
    return torch.randn(batch, 3, size, size, generator=g).to(device), torch.randint(
        0, 3, (batch,), generator=g
    ).to(device)


def peak_memory_mb(args: tuple[str, str, int, int]) -> float:
    """Peak memory growth of a fresh process training one variant (runs in a child)."""
    config, variant, batch, steps = args
    configure_cpu(2)
    device = pick_device()
    if device.type == "cpu":
        # reset the peak-RSS mark (Linux): imports alone reach a higher peak than a tiny model
        Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    model, optimiser, spec = make(Path(config), variant, device)
    images, target = inputs(model, batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        step(model, optimiser, spec, images, target)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (_status_kb("VmHWM") - before) / 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=Path("configs/model_tiny.yaml"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    configure_cpu(args.threads)
    device = pick_device()
    built = {v: make(args.config, v, device) for v in VARIANTS}
    images, target = inputs(built["dense"][0], args.batch, device)
    flops = {}
    for v, (model, optimiser, spec) in built.items():
        for _ in range(3):  # warm-up
            step(model, optimiser, spec, images, target)
        with FlopCounterMode(display=False) as counter:
            step(model, optimiser, spec, images, target)
        flops[v] = counter.get_total_flops()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.steps):
        for v, (model, optimiser, spec) in built.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(model, optimiser, spec, images, target)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[v].append(time.perf_counter() - t0)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        memory = {v: pool.apply(peak_memory_mb, ((str(args.config), v, args.batch, 5),)) for v in VARIANTS}
    median = {v: statistics.median(t) for v, t in times.items()}
    rows = []
    for v in VARIANTS:
        time_ratio = median[v] / median["dense"]
        flop_ratio = flops[v] / flops["dense"]
        rows.append(
            {
                "variant": v,
                "step_ms": round(1000 * median[v], 2),
                "images_per_s": round(args.batch / median[v], 1),
                "gflop_per_step": round(flops[v] / 1e9, 3),
                "time_ratio": round(time_ratio, 3),
                "flop_ratio": round(flop_ratio, 3),
                "time_over_flop": round(time_ratio / flop_ratio, 3),
                "peak_memory_mb": round(memory[v], 1),
            }
        )
    title = f"training step, {args.config.name}, batch {args.batch}, {device.type}, {args.threads} threads"
    report(title, rows, args.json)


if __name__ == "__main__":
    main()
