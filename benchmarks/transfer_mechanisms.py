"""Do the planted mechanisms of generator 5 change what training together does?

    python benchmarks/transfer_mechanisms.py --data ROOT --out DIR [--seeds 1] [--first-seed 0] [--set k=v ...] [--json OUT]

``ROOT`` is a generator-5 benchmark (``taskgroup synth --version 5 --out ROOT``). For every task
that carries a decoy (``truth.yaml``, mechanism ``decoy``), four networks are trained with the
run config (``configs/tiny.yaml`` and ``--set`` overrides; one engine, as ``taskgroup train``):

- ``alone``: the task by itself;
- ``within``: with the most data-rich other member of its planted group (``shared_factor``,
  expected +);
- ``decoy``: with the most data-rich task of the decoy's structure (expected -: the partner
  makes the shortcut salient);
- ``third``: with the most data-rich task of the remaining planted group (neither mechanism).

It prints, per task and seed, the task's primary metric alone and its relative gain with each
partner (higher is better), on validation (the step chosen on validation) and, when the data
has a test split, on test at that step. Networks are trained once into ``--out`` (a rerun
reuses them), so the table can be grown over several runs.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from report import report

from taskgroup.config import load_run_config
from taskgroup.data.synthetic import planted_groups, read_truth, structure_of
from taskgroup.groupings import Grouping
from taskgroup.metrics.summary import relative_gain
from taskgroup.tasks import load_registry
from taskgroup.training.run import train_grouping

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def partners(truth: dict, task: str, decoy_factor: str) -> dict[str, str]:
    """The within, decoy and third-group partner of a decoy task: the most data-rich task of
    each planted group (ties by name)."""
    groups = planted_groups()
    own = truth["tasks"][task]["structure"]
    decoy = structure_of(decoy_factor)
    (third,) = set(groups) - {own, decoy}

    def richest(group: str) -> str:
        members = [t for t in groups[group] if t != task and t in truth["tasks"]]
        return max(sorted(members), key=lambda t: truth["tasks"][t]["train"])

    return {"within": richest(own), "decoy": richest(decoy), "third": richest(third)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--tasks", nargs="*", default=None, help="decoy tasks to measure (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    truth = read_truth(args.data)
    if truth.get("generator_version", 0) < 5:
        raise SystemExit(f"{args.data}: generator {truth.get('generator_version')} plants no mechanism")
    registry = load_registry()
    decoys = {m["tasks"][0]: m["factor"] for m in truth["mechanisms"] if m["mechanism"] == "decoy"}
    targets = [t for t in decoys if args.tasks is None or t in args.tasks]
    groups: dict[str, tuple[str, ...]] = {}
    plan: dict[str, dict[str, str]] = {}
    for task in targets:
        plan[task] = {"alone": f"{task}"}
        groups[task] = (task,)
        for kind, partner in partners(truth, task, decoys[task]).items():
            name = f"{task}+{partner}"
            groups[name] = (task, partner)
            plan[task][kind] = name
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        cfg = load_run_config(CONFIG, [f"data.root={args.data}", f"train.seed={seed}", *args.overrides])
        result = train_grouping(cfg, Grouping("mechanisms", groups), args.out / f"seed{seed}", registry)
        for task in targets:
            higher = registry[task].primary_metric.higher_is_better
            best = {kind: result.networks[name].best[task] for kind, name in plan[task].items()}
            row: dict[str, object] = {"task": task, "seed": seed, "decoy": decoys[task]}
            for split, key in (("val", "value"), ("test", "test_value")):
                alone = best["alone"].get(key)
                if alone is None:
                    continue
                row[f"{split} alone"] = round(float(alone), 3)
                for kind in ("within", "decoy", "third"):
                    gain = relative_gain(float(best[kind][key]), float(alone), higher)
                    row[f"{split} {kind}"] = f"{gain:+.3f}"
            row["partners"] = ", ".join(plan[task][k].split("+")[1] for k in ("within", "decoy", "third"))
            rows.append(row)
    for kind in ("within", "decoy", "third"):
        for split in ("val", "test"):
            values = [float(r[f"{split} {kind}"]) for r in rows if f"{split} {kind}" in r]
            if values:
                print(
                    f"mean {split} gain with the {kind} partner: {statistics.mean(values):+.3f} ({len(values)})"
                )
    report("gain of each decoy task with a partner over the task alone", rows, args.json)


if __name__ == "__main__":
    main()
