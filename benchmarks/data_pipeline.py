"""Benchmark of the data layer, measured in one run on this machine.

    python benchmarks/data_pipeline.py [--scale small] [--workers 2] [--size 64] [--versions 4 5]

Reports, for each generator version in one run (generator 5 draws only the structures an image's
tasks read, and a test split): synthetic generation time and images/s; validation (load_index) rows/s; dataset
examples/s (decode + resize + normalise) at the training image size; and the ratio of one
epoch's decode time to its validation time. Numbers go to stdout as a rich table and, with
--json, to a file.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from report import report

from taskgroup.data import TaskDataset, find_roots, load_index
from taskgroup.data.synthetic import generate
from taskgroup.tasks import load_registry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", default="small")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--versions", type=int, nargs="+", default=[4, 5])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = [measure(args, version) for version in args.versions]
    report("data pipeline", rows, args.json)


def measure(args: argparse.Namespace, version: int) -> dict[str, object]:
    registry = load_registry()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = generate(
            Path(tmp) / "synth", registry, args.scale, seed=0, workers=args.workers, version=version
        )
        gen = time.perf_counter() - t0
        root = find_roots(summary.out)["train"]
        t0 = time.perf_counter()
        index = load_index(root, registry)
        validate = time.perf_counter() - t0
        rows = sum(index.counts().values())
        t0 = time.perf_counter()
        n = 0
        for spec in registry:
            dataset = TaskDataset(spec, index[spec.id], args.size)
            for i in range(len(dataset)):
                dataset[i]
                n += 1
        decode = time.perf_counter() - t0
    return {
        "generator": version,
        "scale": args.scale,
        "workers": args.workers,
        "images_generated": summary.images,
        "generation_s": round(gen, 2),
        "generation_images_per_s": round(summary.images / gen, 1),
        "validation_rows_per_s": round(rows / validate, 1),
        "dataset_examples_per_s": round(n / decode, 1),
        "decode_over_validation": round(decode / validate, 2),
    }


if __name__ == "__main__":
    main()
