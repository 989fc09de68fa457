from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from taskgroup.data import MultiTaskBatchSampler, find_roots, load_index, split_index, task_probabilities


@pytest.fixture(scope="module")
def synth_index(tiny_synth, registry):
    return load_index(find_roots(tiny_synth)["train"], registry)


def test_split_keeps_every_image_on_one_side(synth_index):
    split = split_index(synth_index, 0.25, seed=1)
    sides: dict = {}
    shared = 0
    for side, chosen in (("train", split.train), ("val", split.val)):
        for task, positions in chosen.items():
            for p in positions:
                image = synth_index[task][p].image_file
                assert sides.setdefault(image, side) == side, f"{image} is on both sides"
    tasks_per_image = Counter(r.image_file for rs in synth_index.records.values() for r in rs)
    shared = sum(1 for n in tasks_per_image.values() if n > 1)
    assert shared > 0  # the synthetic data shares images between tasks, as the real data does


def test_split_is_stratified_per_task_and_class(synth_index):
    split = split_index(synth_index, 0.25, seed=0)
    for task, records in synth_index.records.items():
        n_val = len(split.val[task])
        assert len(split.train[task]) + n_val == len(records)
        assert abs(n_val - 0.25 * len(records)) <= max(2, 0.1 * len(records)), task
    records = synth_index["fetal_plane_cls"]
    labels_all = Counter(r.label for r in records)
    labels_val = Counter(records[p].label for p in split.val["fetal_plane_cls"])
    for label, n in labels_all.items():
        assert abs(labels_val[label] - 0.25 * n) <= 1


def test_split_is_deterministic_by_seed(synth_index):
    assert split_index(synth_index, 0.2, seed=3) == split_index(synth_index, 0.2, seed=3)
    assert split_index(synth_index, 0.2, seed=3) != split_index(synth_index, 0.2, seed=4)


def test_task_probabilities():
    sizes = {"a": 100, "b": 400, "c": 1600}
    assert task_probabilities(sizes, "uniform") == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert task_probabilities(sizes, "proportional") == pytest.approx(
        {"a": 1 / 21, "b": 4 / 21, "c": 16 / 21}
    )
    # T = 2: p ~ sqrt(n) = 10, 20, 40
    assert task_probabilities(sizes, "temperature", 2.0) == pytest.approx(
        {"a": 1 / 7, "b": 2 / 7, "c": 4 / 7}
    )
    with pytest.raises(ValueError, match="'a' has no training examples"):
        task_probabilities({"a": 0}, "uniform")


def test_sampler_frequencies_and_epochs():
    sampler = MultiTaskBatchSampler({"a": 10, "b": 40}, batch_size=4, strategy="proportional", seed=0)
    draws = [sampler.next_batch() for _ in range(4000)]
    share_a = sum(1 for t, _ in draws if t == "a") / len(draws)
    assert share_a == pytest.approx(0.2, abs=0.02)
    seen = [p for t, ps in draws if t == "a" for p in ps][:10]
    assert sorted(seen) == list(range(10))  # without replacement within an epoch


def test_sampler_resumes_on_the_same_sequence():
    a = MultiTaskBatchSampler({"a": 7, "b": 13}, batch_size=3, strategy="temperature", seed=5)
    first = [a.next_batch() for _ in range(25)]
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(25)]
    b = MultiTaskBatchSampler({"a": 7, "b": 13}, batch_size=3, strategy="temperature", seed=5)
    b.load_state_dict(state)
    assert [b.next_batch() for _ in range(25)] == rest
    c = MultiTaskBatchSampler({"a": 7, "b": 13}, batch_size=3, strategy="temperature", seed=5)
    assert [c.next_batch() for _ in range(25)] == first
    assert np.mean([len(p) for _, p in first]) == 3
