"""Each image is decoded at most once per process (issue 25 review): the in-process cache, the
record of decoded files a later process reads, the resized images validation keeps for
preloading, and OS errors that are not the file's fault."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import CLS_DIR, DET_DIR, REG_DIR, SEG_DIR, make_fixture_root
from PIL import Image

from taskgroup.config import DataConfig
from taskgroup.data import TaskDataset, fmuia
from taskgroup.data.fmuia import load_index
from taskgroup.errors import ConfigError, DataError
from taskgroup.training.data import prepare_data

DET_IMAGE = Path(DET_DIR) / "n, 1.png"
#: the image and mask files of the fixture root
FIXTURE_FILES = 8


@pytest.fixture
def fresh(monkeypatch):
    """A process that has decoded nothing yet, counting what it opens with Pillow."""
    monkeypatch.setattr(fmuia, "_DECODED", fmuia._LRU(1000))
    monkeypatch.setattr(fmuia, "RETRY_DELAYS", (0.0, 0.0))
    opened: list[Path] = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(Path(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return opened


def _touch(path: Path) -> None:
    """Give a file a new identity (modification and change times) without changing it."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_a_small_cache_does_not_lose_results(fixture_root, registry, fresh, monkeypatch):
    """The reviewed bug: the cache was cleared before the results it held were read (KeyError)."""
    monkeypatch.setattr(fmuia, "_DECODED", fmuia._LRU(1))
    first = load_index(fixture_root, registry)
    _touch(fixture_root / DET_IMAGE)  # decoded again; every other file found (or not) in the cache
    again = load_index(fixture_root, registry)
    assert again.records == first.records


def test_a_file_is_decoded_once_per_process(fixture_root, registry, fresh):
    load_index(fixture_root, registry)
    assert len(fresh) == FIXTURE_FILES
    load_index(fixture_root, registry, tasks=["thyroid_nodule_det"])
    assert len(fresh) == FIXTURE_FILES
    _touch(fixture_root / DET_IMAGE)
    load_index(fixture_root, registry)
    assert fresh[FIXTURE_FILES:] == [fixture_root / DET_IMAGE]


def test_a_broken_file_is_remembered_as_broken(fixture_root, registry, fresh):
    path = fixture_root / DET_IMAGE
    path.write_bytes(path.read_bytes()[:-40])
    for _ in range(2):
        index = load_index(fixture_root, registry, skip_bad=True)
        assert "is unreadable" in index.bad_rows[0].reason
    assert fresh.count(path) == 1


def _failing_open(monkeypatch, path: Path, code: int, times: int) -> dict[str, int]:
    """Make Pillow's open of ``path`` fail ``times`` times (``left``) with an OS error ``code``."""
    state = {"left": times, "failed": 0}
    real_open = Image.open

    def flaky_open(fp, *args, **kwargs):
        if Path(fp) == path and state["left"] > 0:
            state["left"] -= 1
            state["failed"] += 1
            raise OSError(code, os.strerror(code), str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", flaky_open)
    return state


def test_a_transient_error_is_retried(fixture_root, registry, fresh, monkeypatch):
    path = fixture_root / DET_IMAGE
    state = _failing_open(monkeypatch, path, errno.EIO, times=2)
    assert load_index(fixture_root, registry).counts()["thyroid_nodule_det"] == 1
    assert state["failed"] == 2


def test_a_lasting_io_error_is_an_error_and_not_remembered(
    fixture_root, registry, fresh, monkeypatch, tmp_path
):
    path = fixture_root / DET_IMAGE
    record_dir = tmp_path / "cache"
    state = _failing_open(monkeypatch, path, errno.EIO, times=100)
    with pytest.raises(DataError, match=r"could not be read .* an error of the file system, not of the file"):
        load_index(fixture_root, registry, skip_bad=True, record_dir=record_dir)
    assert state["failed"] == len(fmuia.RETRY_DELAYS) + 1
    state["left"] = 0  # the file system is back
    index = load_index(fixture_root, registry, record_dir=record_dir)
    assert index.counts()["thyroid_nodule_det"] == 1 and index.bad_rows == ()


def test_a_permission_error_is_a_bad_row_not_remembered(fixture_root, registry, fresh, monkeypatch):
    path = fixture_root / DET_IMAGE
    _failing_open(monkeypatch, path, errno.EACCES, times=1)
    index = load_index(fixture_root, registry, skip_bad=True)
    assert "cannot be read: Permission denied" in index.bad_rows[0].reason
    assert load_index(fixture_root, registry).bad_rows == ()  # readable now: decoded again


def test_a_later_process_reads_the_record(fixture_root, registry, fresh, monkeypatch, tmp_path):
    record_dir = tmp_path / "cache" / "decoded"
    first = load_index(fixture_root, registry, record_dir=record_dir)
    (record,) = record_dir.glob("*.json")
    data = json.loads(record.read_text())
    assert data["format"] == "taskgroup-decoded-files" and data["root"] == str(fixture_root)
    assert len(data["files"]) == FIXTURE_FILES
    monkeypatch.setattr(fmuia, "_DECODED", fmuia._LRU(1000))  # a new process
    del fresh[:]
    assert load_index(fixture_root, registry, record_dir=record_dir).records == first.records
    assert fresh == []
    path = fixture_root / DET_IMAGE  # broken since: its identity changed, it is decoded again
    path.write_bytes(path.read_bytes()[:-40])
    monkeypatch.setattr(fmuia, "_DECODED", fmuia._LRU(1000))
    index = load_index(fixture_root, registry, skip_bad=True, record_dir=record_dir)
    assert fresh == [path] and "is unreadable" in index.bad_rows[0].reason
    assert f"image:{path}" not in json.loads(record.read_text())["files"]  # bad files are not recorded


def test_a_foreign_or_unwritable_record_is_no_error(fixture_root, registry, fresh, tmp_path, caplog):
    record_dir = tmp_path / "cache"
    record_dir.mkdir()
    record = fmuia._DecodeRecord(record_dir, fixture_root).path
    record.write_text('{"format": "taskgroup-decoded-files", "version": 1, "root": "x", "files": []}')
    assert load_index(fixture_root, registry, record_dir=record_dir).counts()["FUGC"] == 1
    assert json.loads(record.read_text())["root"] == str(fixture_root)  # replaced
    blocked = tmp_path / "file"
    blocked.write_text("")
    fmuia._DECODED._items.clear()
    assert load_index(fixture_root, registry, record_dir=blocked / "decoded").counts()["FUGC"] == 1
    assert "record of decoded files was not written" in caplog.text


@pytest.mark.parametrize("size", [16, 23])
def test_resized_files_are_what_the_dataset_reads(fixture_root, registry, fresh, size):
    index = load_index(fixture_root, registry, keep_size=size)
    assert len(index.resized) == FIXTURE_FILES
    for task, records in index.records.items():
        dataset = TaskDataset(registry[task], records, size)
        for i, record in enumerate(records):
            kept = torch.from_numpy(index.resized[(record.image_file, "image")]).permute(2, 0, 1)
            assert torch.equal(kept, dataset.read_image(i)), record.image_path  # png, jpeg, jpg, bmp
            if record.mask_file is not None:
                mask = torch.from_numpy(index.resized[(record.mask_file, "mask")].astype(np.int64))
                assert torch.equal(mask, dataset.target(record))


def test_resized_files_stay_within_their_budget(fixture_root, registry, fresh):
    index = load_index(fixture_root, registry, keep_size=16, keep_bytes=3 * 16 * 16 * 2)
    assert sum(a.nbytes for a in index.resized.values()) <= 3 * 16 * 16 * 2
    assert len(index.resized) == 2


def test_preloading_decodes_each_file_once(tmp_path, registry, fresh):
    data = tmp_path / "data"
    for split in ("train", "val"):
        make_fixture_root(data / split)
    tasks = ["breast_3cls", "cervix_multi", "thyroid_nodule_det", "FUGC"]
    cfg = DataConfig(root=str(data), image_size=16, cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg, registry, tasks)
    assert len(fresh) == 2 * FIXTURE_FILES and len(set(fresh)) == 2 * FIXTURE_FILES
    for split in (prepared.train, prepared.val):  # as read without preloading
        for task in tasks:
            batch = split.batch(task, range(split.size(task)))
            dataset = split.datasets[task]
            assert torch.equal(batch.images, torch.stack([dataset[i].image for i in range(len(dataset))]))
            assert torch.equal(batch.targets, torch.stack([dataset[i].target for i in range(len(dataset))]))
    del fresh[:]
    fmuia._DECODED._items.clear()  # a later process validating without preloading decodes nothing
    prepare_data(DataConfig(root=str(data), preload=False, cache_dir=cfg.cache_dir), registry, tasks)
    assert fresh == []


def test_paths_are_resolved_once(fixture_root, registry, fresh, monkeypatch):
    resolved: list[str] = []
    real = fmuia.resolve_path

    def counting(root, csv_path):
        resolved.append(csv_path)
        return real(root, csv_path)

    monkeypatch.setattr(fmuia, "resolve_path", counting)
    load_index(fixture_root, registry)
    assert len(resolved) == len(set(resolved)) == FIXTURE_FILES


def test_thread_cap_is_read_by_the_runtime_helper(fixture_root, registry, fresh, monkeypatch):
    monkeypatch.setenv("TASKGROUP_MAX_THREADS", "many")
    with pytest.raises(ConfigError, match="TASKGROUP_MAX_THREADS='many'"):
        load_index(fixture_root, registry)
    monkeypatch.setenv("TASKGROUP_MAX_THREADS", "1")
    assert load_index(fixture_root, registry).counts()["FUGC"] == 1


def test_fixture_files(fixture_root):
    """FIXTURE_FILES counts what the fixture root holds (images and masks)."""
    found = [p for d in (SEG_DIR, CLS_DIR, DET_DIR, REG_DIR) for p in (fixture_root / d).rglob("*.*")]
    assert len(found) == FIXTURE_FILES


def test_commands_without_a_config_keep_the_record(fixture_root, registry, fresh, monkeypatch, tmp_path):
    """``taskgroup tasks`` and ``taskgroup evaluate`` record the files they decoded where training
    does (``<data.cache_dir>/decoded``, the default cache folder), and read that record."""
    from taskgroup.cli import main
    from taskgroup.config import record_dir
    from taskgroup.data.submission import ground_truth_as_predictions, write_predictions

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = record_dir(DataConfig())
    assert folder == tmp_path / "home" / ".cache" / "taskgroup" / "decoded"
    assert main(["tasks", "--data", str(fixture_root)]) == 0
    (record,) = folder.glob("*.json")
    assert len(json.loads(record.read_text())["files"]) == FIXTURE_FILES
    pred = tmp_path / "pred"
    write_predictions(pred, ground_truth_as_predictions(load_index(fixture_root, registry)))
    monkeypatch.setattr(fmuia, "_DECODED", fmuia._LRU(1000))  # a new process
    del fresh[:]
    assert main(["evaluate", "--gt", str(fixture_root), "--pred", str(pred)]) == 0
    # validation decoded nothing: only the two ground-truth masks were opened, to be scored
    opened = [p for p in fresh if p.is_relative_to(fixture_root)]
    assert len(opened) == 2 and all("masks" in p.parts for p in opened), opened
