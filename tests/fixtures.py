"""Tiny FM_UIA-layout roots written by tests: real-style awkward paths, one row per task kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

#: the default config (the tiny synthetic setting a new user runs)
TINY_CONFIG = Path(__file__).parents[1] / "configs" / "tiny.yaml"

NBSP = "\u00a0"
# (task_id, folder, file name): commas, spaces, parentheses, "+", U+00A0, mixed extensions
SEG_DIR = f"Segmentation/Three/Cervix (A+B), set{NBSP}1"
CLS_DIR = "Classification/Three/Breast, US (BUSI)"
DET_DIR = "Detection/One/Thyroid + nodules"
REG_DIR = f"Regression/FUGC{NBSP}(2024)"


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_fixture_root(root: Path) -> Path:
    """Write a valid root: one seg (cervix_multi), cls (breast_3cls), det and reg row per CSV,
    images of size 40x30 (W x H), the seg task spanning two CSV files."""
    rng = np.random.default_rng(0)
    h, w = 30, 40

    def image(name: str) -> np.ndarray:
        return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)

    mask = np.zeros((h, w), dtype=np.uint8)
    mask[5:15, 10:30] = 1
    mask[15:20, 10:30] = 2
    seg_rows = []
    for k, name in enumerate(["img 1 (copy)+x.png", f"img{NBSP}2, b.jpg"]):
        _save(root / SEG_DIR / "images" / name, image(name))
        mask_name = Path(name).with_suffix(".png").name
        _save(root / SEG_DIR / "masks" / mask_name, mask if k == 0 else np.zeros_like(mask))
        seg_rows.append(
            {
                "image_path": f"../{SEG_DIR}/images/{name}",
                "task_id": "cervix_multi",
                "task_name": "segmentation",
                "num_classes": 3,
                "mask_path": f"../{SEG_DIR}/masks/{mask_name}",
            }
        )
    _save(root / CLS_DIR / "benign (1).jpeg", image("c"))
    _save(root / CLS_DIR / "normal+2.bmp", image("d"))
    cls_rows = [
        {
            "image_path": f"../{CLS_DIR}/benign (1).jpeg",
            "task_id": "breast_3cls",
            "task_name": "classification",
            "num_classes": 3,
            "mask": 0,
        },
        {
            "image_path": f"../{CLS_DIR}/normal+2.bmp",
            "task_id": "breast_3cls",
            "task_name": "classification",
            "num_classes": 3,
            "mask": 2,
        },
    ]
    _save(root / DET_DIR / "n, 1.png", image("e"))
    det_rows = [
        {
            "image_path": f"../{DET_DIR}/n, 1.png",
            "task_id": "thyroid_nodule_det",
            "task_name": "detection",
            "num_classes": 1,
            "x_min": 4.5,
            "y_min": 3,
            "x_max": 20,
            "y_max": 25.5,
        }
    ]
    _save(root / REG_DIR / "p (1).png", image("f"))
    reg_rows = [
        {
            "image_path": f"../{REG_DIR}/p (1).png",
            "task_id": "FUGC",
            "task_name": "Regression",
            "num_classes": 2,
            "point_1_xy": "[10.5, 12]",
            "point_2_xy": "[30, 20.25]",
        }
    ]
    csv_dir = root / "csv_files"
    csv_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(seg_rows[:1]).to_csv(csv_dir / "Seg-Three_1.Cervix_1.csv", index=False)
    pd.DataFrame(seg_rows[1:]).to_csv(csv_dir / "Seg-Three_2.Cervix_1.csv", index=False)
    pd.DataFrame(cls_rows).to_csv(csv_dir / "Cls-Three_1.BUSI_2.csv", index=False)
    pd.DataFrame(det_rows).to_csv(csv_dir / "Det-One_1.Thyroid_1.csv", index=False)
    pd.DataFrame(reg_rows).to_csv(csv_dir / "Reg_1.FUGC_1.csv", index=False)
    return root


def edit_csv(root: Path, name: str, row: int, **values) -> None:
    """Change cells of one data row (0-based) of a fixture CSV."""
    path = root / "csv_files" / name
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col, value in values.items():
        frame.loc[row, col] = value
    frame.to_csv(path, index=False)


def make_held_out_root(synth: Path, out: Path, flip: str) -> Path:
    """A root with ``train/`` and ``val/`` of the synthetic benchmark ``synth`` and a ``test/``
    holding val's images with the labels of the binary classification task ``flip`` flipped
    (``1 - label``), so test scores differ from val: the flipped task's test accuracy is
    1 - its val accuracy, every other task scores on test as on val. Images are shared through
    symlinks (nothing large is copied)."""
    import os

    out.mkdir(parents=True)
    for split in ("train", "val"):
        os.symlink(synth / split, out / split)
    (out / "test" / "csv_files").mkdir(parents=True)
    for item in (synth / "val").iterdir():
        if item.name != "csv_files":
            os.symlink(item, out / "test" / item.name)
    for csv in (synth / "val" / "csv_files").glob("*.csv"):
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
        if (frame["task_id"] == flip).any():
            rows = frame["task_id"] == flip
            frame.loc[rows, "mask"] = (1 - frame.loc[rows, "mask"].astype(int)).astype(str)
            frame.to_csv(out / "test" / "csv_files" / csv.name, index=False)
        else:
            (out / "test" / "csv_files" / csv.name).write_bytes(csv.read_bytes())
    return out


def make_val_only_root(synth: Path, out: Path) -> Path:
    """The same benchmark without a test split: ``train/`` and ``val/`` only (symlinks)."""
    import os

    out.mkdir(parents=True)
    for split in ("train", "val"):
        os.symlink(synth / split, out / split)
    return out


def make_subset_root(synth: Path, out: Path, tasks: list[str], splits=("train", "val")) -> Path:
    """A root in the FM_UIA layout holding only ``tasks`` of the synthetic benchmark ``synth``:
    each split's CSVs cut to those tasks' rows (files left without rows are not written), its
    image folders shared through symlinks."""
    import os

    for split in splits:
        (out / split / "csv_files").mkdir(parents=True)
        for item in (synth / split).iterdir():
            if item.name != "csv_files":
                os.symlink(item, out / split / item.name)
        for csv in (synth / split / "csv_files").glob("*.csv"):
            frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
            kept = frame[frame["task_id"].isin(tasks)]
            if len(kept):
                kept.to_csv(out / split / "csv_files" / csv.name, index=False)
    return out
