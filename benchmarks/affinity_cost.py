"""Wall-time overhead of the affinity probes over plain AU training of the same steps.

    python benchmarks/affinity_cost.py [--config configs/tiny.yaml] [--steps 600] [--every N]

Measured in one run, on all 27 tasks of the synthetic benchmark with the tiny config: the same
AU training (same seed, same model, same batches) taken ``--steps`` steps three times, plain,
with the ``gradient`` probe alone and with the ``lookahead`` probe alone (which needs the same
per-task gradients), each at its default frequency (``affinity.every``,
``affinity.lookahead_every``) or the one given.
The ratios are wall time with the probe / plain wall time (targets, issue 5: gradient <= 1.2x,
lookahead <= 1.5x). The encoder is random: cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from report import au_engine, report

from taskgroup.affinity.probes import AffinityProbe
from taskgroup.config import load_run_config
from taskgroup.runtime import configure_cpu
from taskgroup.tasks import load_registry
from taskgroup.training import prepare_data


def measure(cfg, registry, data, steps: int, probe: AffinityProbe | None) -> tuple[float, int]:
    with au_engine(cfg, registry, data) as engine:
        for _ in range(5):  # warm-up, not timed
            engine.train_step()
        start = time.perf_counter()
        for _ in range(steps):
            output = engine.train_step()
            if probe is not None:
                probe.on_step_end(engine, output)
        wall = time.perf_counter() - start
    return wall, (probe.cost["probes"] if probe is not None else 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=Path("configs/tiny.yaml"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument(
        "--every", type=int, default=None, help="gradient probe frequency (default: the config's)"
    )
    parser.add_argument(
        "--lookahead-every", type=int, default=None, help="lookahead frequency (default: the config's)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cfg = load_run_config(args.config, ["model.backbone.pretrained=null", *args.overrides])
    configure_cpu(cfg.train.threads)
    registry = load_registry(cfg.registry)
    data = prepare_data(cfg.data, registry, registry.ids)
    aff = cfg.affinity
    every = args.every or aff.every
    look_every = args.lookahead_every or aff.lookahead_every or every
    variants = {
        "plain": None,
        "gradient": AffinityProbe(
            every, lookahead=False, gradient=True, blocks=aff.blocks, batch=aff.probe_batch
        ),
        "lookahead": AffinityProbe(
            every,
            lookahead=True,
            gradient=False,
            blocks=aff.blocks,
            batch=aff.probe_batch,
            lookahead_every=look_every,
        ),
    }
    rows, plain = [], None
    for name, probe in variants.items():
        wall, probes = measure(cfg, registry, data, args.steps, probe)
        plain = plain or wall
        rows.append(
            {
                "variant": name,
                "steps": args.steps,
                "probe every": (look_every if name == "lookahead" else every) if probe else "-",
                "probes": probes,
                "wall s": round(wall, 1),
                "s per probe": round((wall - plain) / probes, 2) if probes else "-",
                "ratio to plain": round(wall / plain, 2),
            }
        )
    report(f"affinity probe overhead, {len(registry.ids)} tasks ({args.config})", rows, args.json)


if __name__ == "__main__":
    main()
