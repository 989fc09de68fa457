"""Official metrics against hand-computed values, including the empty-mask and missing-class rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import directed_hausdorff
from torchvision.ops import box_iou

from taskgroup.metrics import (
    ClassificationMetric,
    DetectionMetric,
    RegressionMetric,
    SegmentationMetric,
    classification_metrics,
    dice_per_class,
    hausdorff_per_class,
    paired_box_iou,
    resize_nearest,
    type_level_summary,
)

GT = np.array([[0, 1, 1], [0, 1, 0], [2, 2, 0]])
PRED = np.array([[1, 1, 0], [0, 1, 0], [2, 0, 0]])


def test_dice_per_class_by_hand():
    # class 1: |P&G| = 2, |P| + |G| = 6; class 2: 1 of 1+2; background: 3 of 5+4; class 3: both empty
    np.testing.assert_allclose(dice_per_class(PRED, GT, 4), [6 / 9, 4 / 6, 2 / 3, 1.0])


def test_hausdorff_by_hand():
    # class 1: (0,0) is 1 from G's (0,1) and G's (0,2) is 1 from P's (0,1); class 2: (2,1) is 1 from (2,0)
    np.testing.assert_allclose(hausdorff_per_class(PRED, GT, 3), [1.0, 1.0, 1.0])
    gt = np.zeros((3, 3), int)
    gt[2, 2] = 1
    pred = np.zeros((3, 3), int)
    pred[0, 0] = 1
    np.testing.assert_allclose(hausdorff_per_class(pred, gt, 2), [1.0, math.sqrt(8)])


def test_hausdorff_empty_rules():
    gt = np.zeros((3, 4), int)
    pred = np.zeros((3, 4), int)
    pred[1, 1] = 2  # class 2 only predicted, class 1 in neither
    hd = hausdorff_per_class(pred, gt, 3)
    assert hd[1] == 0.0
    assert hd[2] == pytest.approx(5.0)  # the diagonal of a 3x4 image
    assert dice_per_class(pred, gt, 3)[1] == 1.0 and dice_per_class(pred, gt, 3)[2] == 0.0


def test_hausdorff_equals_scipy_directed_hausdorff_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        gt = (rng.random((17, 23)) < 0.1).astype(int)
        pred = (rng.random((17, 23)) < 0.1).astype(int)
        if not gt.any() or not pred.any():
            continue
        p, g = np.argwhere(pred == 1), np.argwhere(gt == 1)
        expected = max(directed_hausdorff(p, g)[0], directed_hausdorff(g, p)[0])
        assert hausdorff_per_class(pred, gt, 2)[1] == pytest.approx(expected)


def test_prediction_of_another_size_is_resized_nearest():
    big = np.kron(GT, np.ones((2, 2), int))  # 6x6, each pixel a 2x2 block
    np.testing.assert_allclose(dice_per_class(big, GT, 3), [1, 1, 1])
    np.testing.assert_allclose(hausdorff_per_class(big, GT, 3), [0, 0, 0])


def test_resize_follows_opencv_inter_nearest_on_random_masks_and_sizes():
    """The official scorer resizes a prediction of another size with ``cv2.resize(...,
    INTER_NEAREST)``; taskgroup's resize equals it pixel for pixel. PIL's NEAREST, used before,
    samples pixel centres: on these random masks it gives another class at 44 % of the pixels."""
    cv2 = pytest.importorskip("cv2")
    from PIL import Image

    rng = np.random.default_rng(0)
    pil_differs = total = 0
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        height, width = (int(v) for v in rng.integers(1, 130, 2))
        mask = rng.integers(0, 5, (h, w)).astype(np.uint8)
        expected = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(resize_nearest(mask, (height, width)), expected)
        pil = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
        pil_differs += int((pil != expected).sum())
        total += expected.size
    assert pil_differs > total / 20  # the rule matters: PIL's would have scored other pixels
    # the scores follow: a 6x6 prediction of a 4x4 ground truth is read as OpenCV reads it
    pred = rng.integers(0, 3, (6, 6)).astype(np.uint8)
    gt = rng.integers(0, 3, (4, 4)).astype(np.uint8)
    resized = cv2.resize(pred, (4, 4), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_allclose(dice_per_class(pred, gt, 3), dice_per_class(resized, gt, 3))


def test_hausdorff_equals_simpleitk_on_random_masks():
    """SimpleITK's HausdorffDistanceImageFilter (the official scorer's) on random masks of
    random shapes, blobs and scattered pixels, where both masks hold the class."""
    sitk = pytest.importorskip("SimpleITK")
    from scipy import ndimage

    rng = np.random.default_rng(1)
    checked = 0
    for i in range(40):
        shape = tuple(int(v) for v in rng.integers(5, 60, 2))
        masks = []
        for _ in range(2):
            noise = rng.random(shape)
            if i % 2:  # blobs: smoothed noise, thresholded
                noise = ndimage.gaussian_filter(noise, 2.0)
                masks.append((noise > np.quantile(noise, 0.8)).astype(np.uint8))
            else:
                masks.append((noise < 0.05).astype(np.uint8))
        pred, gt = masks
        if not pred.any() or not gt.any():
            continue
        measure = sitk.HausdorffDistanceImageFilter()
        measure.Execute(sitk.GetImageFromArray(pred), sitk.GetImageFromArray(gt))
        assert hausdorff_per_class(pred, gt, 2)[1] == pytest.approx(measure.GetHausdorffDistance(), abs=1e-9)
        checked += 1
    assert checked >= 30


def test_task_dice_is_foreground_mean_of_per_class_image_means():
    metric = SegmentationMetric(3)
    metric.update(PRED, GT)  # fg dice [2/3, 2/3]
    only_one = GT.copy()
    only_one[only_one == 2] = 0
    metric.update(only_one, GT)  # class 1 perfect (1), class 2 missed (0)
    result = metric.aggregate()
    assert result["dsc"] == pytest.approx(((2 / 3 + 1) / 2 + (2 / 3 + 0) / 2) / 2)
    # hd: image 1 [1, 1]; image 2 class 1 = 0, class 2 predicted empty = diagonal
    assert result["hd"] == pytest.approx(((1 + 0) / 2 + (1 + math.hypot(3, 3)) / 2) / 2)


def test_binary_classification_by_hand():
    y = [0, 1, 1, 0]
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    scores = classification_metrics(y, np.stack([1 - p1, p1], axis=1))
    assert scores.accuracy == 0.25  # predictions 0, 0, 0, 1
    assert scores.auc == 0.5  # 2 of the 4 positive-negative pairs ordered right
    assert scores.f1_macro == pytest.approx(0.2)  # class 0: P 1/3, R 1/2 -> 0.4; class 1: 0
    assert scores.f1_weighted == pytest.approx(0.2)
    assert scores.mcc == pytest.approx(-2 / math.sqrt(12))  # TP 0, TN 1, FP 1, FN 2
    assert scores.auc_note == ""


def test_multiclass_auc_ovr_macro_by_hand():
    y = [0, 1, 2, 0]
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    # class 0 vs rest: positives .8 .5 vs negatives .2 .3 -> 1; class 1: .7 vs .1 .3 .4 -> 1;
    # class 2: .4 vs .1 .1 .1 -> 1
    assert classification_metrics(y, probs).auc == 1.0
    probs[3] = [0.1, 0.4, 0.5]  # class 0 positive .1 now below negatives .2 .3: 2 of 4 pairs
    # class 2: .4 vs .1 .1 .5 -> 2/3; class 1: .7 vs .1 .3 .4 -> 1
    assert classification_metrics(y, probs).auc == pytest.approx((0.5 + 1 + 2 / 3) / 3)


def test_missing_class_gives_official_zero_auc_with_a_note():
    y = [0, 1, 1, 0]
    probs = np.array([[0.6, 0.3, 0.1]] * 4)
    scores = classification_metrics(y, probs)
    assert scores.auc == 0.0
    assert "class(es) [2] absent from the ground truth" in scores.auc_note
    binary = classification_metrics([1, 1], np.array([[0.2, 0.8], [0.6, 0.4]]))
    assert binary.auc == 0.0 and "[0] absent" in binary.auc_note


def test_classification_failures_are_never_right():
    metric = ClassificationMetric(2)
    metric.update([0.2, 0.8], 1)
    metric.add_failure(0)
    assert metric.aggregate()["accuracy"] == 0.5


def test_box_iou_by_hand_and_against_torchvision():
    assert paired_box_iou([[0, 0, 2, 2]], [[1, 1, 3, 3]])[0] == pytest.approx(1 / 7)
    assert paired_box_iou([[1, 1, 1, 1]], [[1, 1, 1, 1]])[0] == 0.0  # union 0
    assert paired_box_iou([[5, 5, 0, 0]], [[0, 0, 5, 5]])[0] == 0.0  # inverted prediction
    rng = np.random.default_rng(0)
    lo = rng.uniform(0, 50, (30, 2))
    a = np.concatenate([lo, lo + rng.uniform(1, 40, (30, 2))], axis=1)
    lo = rng.uniform(0, 50, (30, 2))
    b = np.concatenate([lo, lo + rng.uniform(1, 40, (30, 2))], axis=1)
    expected = box_iou(torch.tensor(a), torch.tensor(b)).diagonal().numpy()
    np.testing.assert_allclose(paired_box_iou(a, b), expected)
    metric = DetectionMetric()
    metric.update([0, 0, 2, 2], [1, 1, 3, 3])
    metric.add_failure()
    assert metric.aggregate()["iou"] == pytest.approx(1 / 14)


def test_mean_radial_error_by_hand():
    metric = RegressionMetric()
    metric.update([[0, 0], [3, 4]], [[0, 0], [0, 0]])  # errors 0 and 5 -> 2.5
    metric.update([[1, 0], [0, 1]], [[0, 0], [0, 0]])  # 1
    assert metric.aggregate()["mre"] == pytest.approx(1.75)
    metric.add_failure((30, 40))
    assert metric.aggregate()["mre"] == pytest.approx((2.5 + 1 + 50) / 3)


def test_type_level_summary_is_the_unweighted_mean_over_tasks(registry):
    per_task = {"lung": {"dsc": 0.5, "hd": 10.0}, "cervix": {"dsc": 1.0, "hd": 0.0}, "IUGC": {"mre": 3.0}}
    summary = type_level_summary(per_task, registry)
    assert summary["seg_dsc"] == 0.75 and summary["seg_hd"] == 5.0 and summary["reg_mre"] == 3.0
    assert math.isnan(summary["det_iou"])
    assert list(summary) == [
        "seg_dsc",
        "seg_hd",
        "cls_accuracy",
        "cls_auc",
        "cls_f1_macro",
        "cls_f1_weighted",
        "cls_mcc",
        "det_iou",
        "reg_mre",
    ]


def test_relative_gain_follows_the_metric_direction():
    from taskgroup.metrics import relative_gain

    assert relative_gain(0.9, 0.8, True) == pytest.approx(0.125)
    assert relative_gain(8.0, 10.0, False) == pytest.approx(0.2)  # a lower MRE is a gain
    assert relative_gain(12.0, 10.0, False) == pytest.approx(-0.2)
    assert math.isnan(relative_gain(0.5, 0.0, True))
