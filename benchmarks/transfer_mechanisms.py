"""Do generator 5's planted mechanisms change what training together does?

    python benchmarks/transfer_mechanisms.py --data ROOT --out DIR [--tasks T ...] [--seeds 1]
        [--first-seed 0] [--set k=v ...] [--json OUT]

``ROOT`` is a generator-5 benchmark (``taskgroup synth --version 5 --out ROOT``). For every
target task (``--tasks``, default :data:`TARGETS`: the decoy tasks and a data-poor task of each
planted group), networks are trained with the run config (``configs/tiny.yaml`` and ``--set``
overrides; one engine, as ``taskgroup train``): the target alone, and with the most data-rich
other task of each planted group (``within`` its own group, ``across`` the two others; the
group that holds the target's decoy, ``truth.yaml``, is marked). Networks are trained once into
``--out`` (a rerun reuses them), so the table can be grown over several runs.

It prints each target's primary metric alone and its relative gain with each partner (higher is
better) on validation (at the step chosen on validation) and, when the data has a test split,
on test at that step; then the mean within-group and across-group gains and the share of
negative across-group gains (the planted truth says: within > 0, across <= 0).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from report import fail, report

from taskgroup.config import load_run_config
from taskgroup.data.synthetic import planted_groups, read_truth, structure_of
from taskgroup.groupings import Grouping
from taskgroup.metrics.summary import relative_gain
from taskgroup.stages.train import train_grouping
from taskgroup.tasks import load_registry

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
#: the decoy tasks, and data-poor dense tasks of each planted group
TARGETS = (
    "breast_2cls",
    "lung_2cls",
    "liver_lesion_2cls",
    "fetal_heart",
    "FUGC",
    "cervix_multi",
    "carotid_artery",
    "spinal_cord_injury_loc",
)


def partners(truth: dict, task: str) -> dict[str, str]:
    """The most data-rich other task of each planted group (ties by name), keyed by the group."""

    def richest(group: str) -> str:
        members = [t for t in planted_groups()[group] if t != task and t in truth["tasks"]]
        return max(sorted(members), key=lambda t: truth["tasks"][t]["train"])

    return {group: richest(group) for group in planted_groups()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", nargs="*", default=list(TARGETS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    truth = read_truth(args.data)
    if truth.get("generator_version", 0) < 5:
        fail(f"{args.data}: generator {truth.get('generator_version')} plants no mechanism")
    registry = load_registry()
    decoys = {m["tasks"][0]: m["factor"] for m in truth["mechanisms"] if m["mechanism"] == "decoy"}
    groups: dict[str, tuple[str, ...]] = {}
    plan: dict[str, dict[str, str]] = {}  # target -> partner group -> network
    for task in args.tasks:
        groups[task] = (task,)
        plan[task] = {}
        for group, partner in partners(truth, task).items():
            groups[f"{task}+{partner}"] = (task, partner)
            plan[task][group] = f"{task}+{partner}"
    rows, gains = [], {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        cfg = load_run_config(CONFIG, [f"data.root={args.data}", f"train.seed={seed}", *args.overrides])
        result = train_grouping(cfg, Grouping("mechanisms", groups), args.out / f"seed{seed}", registry)
        for task in args.tasks:
            own = truth["tasks"][task]["structure"]
            decoy = structure_of(decoys[task]) if task in decoys else None
            higher = registry[task].primary_metric.higher_is_better
            alone = result.networks[task].best[task]
            for split, key in (("val", "value"), ("test", "test_value")):
                if alone.get(key) is None:
                    continue
                row: dict[str, object] = {"task": task, "seed": seed, "split": split}
                row["alone"] = round(float(alone[key]), 3)
                for group, network in plan[task].items():
                    partner = network.split("+")[1]
                    gain = relative_gain(
                        float(result.networks[network].best[task][key]), float(alone[key]), higher
                    )
                    kind = "within" if group == own else "across"
                    gains.setdefault((split, kind, group == decoy), []).append(gain)
                    label = f"{kind}{' (decoy)' if group == decoy else ''}"
                    row[group] = f"{gain:+.3f} {label} {partner}"
                rows.append(row)
    report(
        "gain of each target with the richest task of each planted group, over the target alone",
        rows,
        args.json,
    )
    for split in ("val", "test"):
        within = gains.get((split, "within", False), [])
        across = gains.get((split, "across", False), []) + gains.get((split, "across", True), [])
        decoy = gains.get((split, "across", True), [])
        if not within:
            continue
        print(
            f"{split}: within mean {statistics.mean(within):+.3f} ({len(within)}), across mean "
            f"{statistics.mean(across):+.3f} ({len(across)}, {sum(g < 0 for g in across)} negative), "
            f"decoy partners {statistics.mean(decoy) if decoy else float('nan'):+.3f} ({len(decoy)})"
        )


if __name__ == "__main__":
    main()
