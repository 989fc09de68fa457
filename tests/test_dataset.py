from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from taskgroup.data import TaskDataset, collate_examples, load_index, to_original_points
from taskgroup.data.dataset import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture
def index(fixture_root, registry):
    return load_index(fixture_root, registry)


def test_targets_in_the_resized_frame(index, registry):
    size = 20  # images are 40 wide, 30 high
    det = TaskDataset(registry["thyroid_nodule_det"], index["thyroid_nodule_det"], size)[0]
    assert det.image.shape == (3, 20, 20) and det.original_size == (30, 40)
    np.testing.assert_allclose(det.target.numpy(), [4.5 / 2, 3 * 2 / 3, 10, 25.5 * 2 / 3], rtol=1e-6)
    reg = TaskDataset(registry["FUGC"], index["FUGC"], size)[0]
    np.testing.assert_allclose(reg.target.numpy(), [[5.25, 8], [15, 13.5]], rtol=1e-6)
    cls = TaskDataset(registry["breast_3cls"], index["breast_3cls"], size)[1]
    assert cls.target.item() == 2 and cls.target.dtype == torch.int64


def test_mask_resized_with_nearest(index, registry):
    ds = TaskDataset(registry["cervix_multi"], index["cervix_multi"], 20)
    mask = ds[0].target
    assert mask.shape == (20, 20) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) == {0, 1, 2}  # no blended values
    # rows 5..14 of 30 are class 1 -> rows 10/3..28/3 of 20; columns 10..29 of 40 -> 5..14
    assert mask[5, 7] == 1 and mask[11, 7] == 2 and mask[5, 2] == 0


def test_image_is_normalised_rgb(index, registry):
    ex = TaskDataset(registry["FUGC"], index["FUGC"], 16)[0]
    lo = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    hi = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    for c in range(3):
        assert lo[c] - 1e-5 <= ex.image[c].min() and ex.image[c].max() <= hi[c] + 1e-5


def test_predictions_map_back_to_original_pixels(index, registry):
    ds = TaskDataset(registry["FUGC"], index["FUGC"], 24)
    ex = ds[0]
    back = to_original_points(ex.target.numpy(), ex.original_size, 24)
    np.testing.assert_allclose(back, index["FUGC"][0].keypoints, rtol=1e-5)


def test_batches_through_a_dataloader(index, registry):
    ds = TaskDataset(registry["breast_3cls"], index["breast_3cls"], 16)
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_examples)))
    assert batch.task_id == "breast_3cls" and batch.images.shape == (2, 3, 16, 16)
    assert batch.targets.tolist() == [0, 2] and batch.original_sizes.tolist() == [[30, 40], [30, 40]]
    with pytest.raises(ValueError, match="one task"):
        collate_examples([ds[0], TaskDataset(registry["FUGC"], index["FUGC"], 16)[0]])


def test_records_of_another_task_are_refused(index, registry):
    with pytest.raises(ValueError, match="a FUGC record given to the breast_3cls dataset"):
        TaskDataset(registry["breast_3cls"], index["FUGC"], 16)
