"""The task-kind registry (taskgroup/kinds.py): a contract test over every entry, and the
layering it allows (nothing in models/ imports data/)."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from taskgroup.errors import ConfigError
from taskgroup.kinds import KINDS, decode_outputs, kind_entry, prediction_entry
from taskgroup.tasks import TaskKind

PACKAGE = Path(__file__).resolve().parent.parent / "taskgroup"
ONE_PER_KIND = {
    TaskKind.SEGMENTATION: "cervix_multi",
    TaskKind.CLASSIFICATION: "breast_3cls",
    TaskKind.DETECTION: "thyroid_nodule_det",
    TaskKind.REGRESSION: "IUGC",
}
SIZE = 16  # image size of the tiny heads: a 4x4 token grid of patch 4


def test_every_kind_has_one_entry():
    assert set(KINDS) == set(TaskKind)
    assert all(entry.kind is kind for kind, entry in KINDS.items())
    assert len({entry.prediction for entry in KINDS.values()}) == len(KINDS)
    with pytest.raises(ConfigError, match="no entry for task kind"):
        kind_entry("sideways")  # type: ignore[arg-type]


def _target(spec, batch: int) -> torch.Tensor:
    """A ground truth of the kind in the resized frame's pixels, as the datasets give it."""
    g = torch.Generator().manual_seed(0)
    if spec.kind is TaskKind.SEGMENTATION:
        return torch.randint(0, spec.num_classes, (batch, SIZE, SIZE), generator=g)
    if spec.kind is TaskKind.CLASSIFICATION:
        return torch.arange(batch) % spec.num_classes  # every image a different class
    if spec.kind is TaskKind.DETECTION:
        lo = torch.rand(batch, 2, generator=g) * SIZE / 2
        return torch.cat([lo, lo + SIZE / 4], dim=1)
    return torch.rand(batch, spec.num_keypoints, 2, generator=g) * SIZE


def _perfect_output(spec, target: torch.Tensor) -> torch.Tensor:
    """The raw head output that decodes to the ground truth itself."""
    if spec.kind is TaskKind.SEGMENTATION:
        return torch.nn.functional.one_hot(target, spec.num_classes).permute(0, 3, 1, 2).float() * 50
    if spec.kind is TaskKind.CLASSIFICATION:
        return torch.nn.functional.one_hot(target, spec.num_classes).float() * 50
    if spec.kind is TaskKind.DETECTION:
        return torch.cat([target / SIZE, torch.zeros(len(target), 1)], dim=1)
    return target / SIZE


def _truth(spec, target: torch.Tensor, i: int):
    """The ground truth of image ``i`` as the metrics take it (original pixels)."""
    if spec.kind is TaskKind.CLASSIFICATION:
        return int(target[i])
    value = target[i].numpy()
    if spec.kind is TaskKind.SEGMENTATION:
        return value.astype(np.int64)
    return tuple(value.tolist()) if spec.kind is TaskKind.DETECTION else tuple(map(tuple, value.tolist()))


@pytest.mark.parametrize("kind", list(TaskKind), ids=lambda k: k.short)
def test_kind_entry_contract(registry, kind):
    spec = registry[ONE_PER_KIND[kind]]
    entry = kind_entry(spec)
    batch = 3
    torch.manual_seed(0)
    # the head reads a tiny feature map and the loss is a finite scalar with a gradient
    head = entry.head(spec, 8, 4, SIZE, 8)
    features = torch.randn(batch, 8, SIZE // 4, SIZE // 4)
    output = head(features)
    assert output.shape[0] == batch
    target = _target(spec, batch)
    loss = entry.loss(output, target, SIZE)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in head.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    # the attribution score is a scalar, the occlusion output one vector per image
    assert entry.score(output).ndim == 0
    assert entry.output(output).shape[0] == batch
    # decode returns the documented prediction type, one per image of the batch
    records = [
        SimpleNamespace(image_path=f"img{i}.png", size=(SIZE, SIZE), mask_path=f"m{i}.png", label=int(i))
        for i in range(batch)
    ]
    predictions = decode_outputs(
        spec, _perfect_output(spec, target), SimpleNamespace(indices=torch.arange(batch)), records
    )
    assert [type(p) for p in predictions] == [entry.prediction] * batch
    assert all(prediction_entry(p) is entry for p in predictions)
    assert [p.image_path for p in predictions] == [r.image_path for r in records]
    # the metric of a perfect prediction is its best value on every metric of the kind
    metric = entry.metric(spec)
    for i, p in enumerate(predictions):
        entry.update(metric, p, _truth(spec, target, i))
    values = metric.aggregate()
    for m in spec.metrics:
        assert values[m.name] == pytest.approx(1.0 if m.higher_is_better else 0.0, abs=1e-5), m.name
    assert isinstance(entry.note(metric), str)
    # a missing prediction is a failure the metric can count
    failed = entry.metric(spec)
    entry.add_failure(failed, records[0])
    assert set(failed.aggregate()) >= {m.name for m in spec.metrics}


def test_decode_maps_back_to_original_pixels(registry):
    spec = registry["thyroid_nodule_det"]
    record = SimpleNamespace(image_path="a.png", size=(30, 40), mask_path=None)
    (pred,) = decode_outputs(
        spec,
        torch.tensor([[0.25, 0.5, 0.75, 1.0, 0.0]]),
        SimpleNamespace(indices=torch.tensor([0])),
        [record],
    )
    np.testing.assert_allclose(pred.box, [10.0, 15.0, 30.0, 30.0], rtol=1e-6)
    assert pred.size == (30, 40)


def _imports(path: Path) -> list[str]:
    """The modules a file imports (absolute names; relative imports resolved in the package)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def test_models_import_nothing_from_data():
    files = sorted((PACKAGE / "models").glob("*.py"))
    assert files
    offenders = {
        f.name: name
        for f in files
        for name in _imports(f)
        if name == "taskgroup.data" or name.startswith("taskgroup.data.")
    }
    assert not offenders, f"models/ imports data/: {offenders}"
