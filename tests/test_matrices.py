"""The affinity matrix type (issue 26): its file is byte for byte the ``matrix.csv`` the affinity
run wrote before it existed, it round-trips, it subsets, a bad file is named in the error, and
``read_matrix`` / ``read_estimators`` still hand out the same frame and values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from taskgroup.affinity.report import matrix_frame, read_matrix
from taskgroup.errors import DataError
from taskgroup.matrices import CORNER, AffinityMatrix
from taskgroup.stages.search import read_estimators

ROOT = Path(__file__).resolve().parent.parent
#: written by ``matrix_frame(m, tasks).to_csv(path)`` before AffinityMatrix existed (nan, inf,
#: -0.0, subnormal and long floats)
OLD = Path(__file__).resolve().parent / "data" / "matrices" / "old_matrix.csv"
COMMITTED = sorted((ROOT / "benchmarks" / "truth_table" / "affinity").glob("*/matrix.csv"))
TASKS = ("a", "b", "c")


def example(method: str = "gradient") -> AffinityMatrix:
    values = np.arange(9, dtype=float).reshape(3, 3) / 7.0
    return AffinityMatrix(TASKS, values, method, meta={"note": "x"})


@pytest.fixture(autouse=True)
def _denormals_kept():
    """The old file holds 5e-324, a denormal: a test that ran configure_cpu earlier in this
    worker process (torch.set_flush_denormal(True), process-wide) would read it as 0. Files
    round-trip exactly with denormals kept, which is what these tests hold."""
    import torch

    flushing = bool((torch.tensor([5e-324], dtype=torch.float64) * 1.0 == 0).item())  # the state now
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(flushing)  # as the process had it


@pytest.mark.parametrize("path", [OLD, *COMMITTED], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_read_then_write_gives_the_same_bytes(path, tmp_path):
    matrix = AffinityMatrix.from_csv(path)
    assert (matrix.method, matrix.quantity) == (path.parent.name, path.stem)
    assert matrix.meta["source"] == str(path)
    out = matrix.to_csv(tmp_path / "matrix.csv")
    assert out.read_bytes() == path.read_bytes()


def test_the_old_file_reads_back_exactly():
    matrix = AffinityMatrix.from_csv(OLD)
    assert matrix.tasks == ("breast_2cls", "thyroid_nodule", "fetal_head", "FUGC")
    v = matrix.values
    assert np.isnan(v[0, 2]) and np.isnan(v[3, 0])
    assert v[1, 2] == np.inf and v[1, 3] == -np.inf
    assert v[0, 1] == 0.0 and np.signbit(v[0, 1])
    assert v[2, 3] == 5e-324 and v[2, 0] == 0.1 + 0.2


def test_the_same_bytes_as_the_old_writer_on_the_same_matrix(tmp_path):
    """The old code path (a labelled frame to_csv) and the new one on one matrix."""
    values = np.random.default_rng(0).normal(size=(3, 3)) * 10.0 ** np.arange(-9, 0).reshape(3, 3)
    values[0, 1] = np.nan
    old = pd.DataFrame(values, index=list(TASKS), columns=list(TASKS))
    old.index.name = CORNER
    old.to_csv(tmp_path / "old.csv")
    AffinityMatrix(TASKS, values, "m").to_csv(tmp_path / "new.csv")
    assert (tmp_path / "new.csv").read_bytes() == (tmp_path / "old.csv").read_bytes()


def test_round_trip(tmp_path):
    matrix = example()
    (tmp_path / "gradient").mkdir()
    back = AffinityMatrix.from_csv(matrix.to_csv(tmp_path / "gradient" / "cosine.csv"), meta={"k": 1})
    assert back.tasks == TASKS
    np.testing.assert_array_equal(back.values, matrix.values)
    assert (back.method, back.quantity) == ("gradient", "cosine")
    assert back.meta["k"] == 1
    back = AffinityMatrix.from_csv(tmp_path / "gradient" / "cosine.csv", method="m", quantity="q")
    assert (back.method, back.quantity) == ("m", "q")


def test_read_matrix_is_the_frame_it_read_before(tmp_path):
    """``read_matrix`` returned ``pd.read_csv(path, index_col=0)`` (checked): still that frame."""
    for path in [OLD, *COMMITTED]:
        pd.testing.assert_frame_equal(read_matrix(path), pd.read_csv(path, index_col=0), check_exact=True)
    pd.testing.assert_frame_equal(example().frame(), matrix_frame(example().values, TASKS), check_exact=True)


def test_frozen_and_read_only():
    source = np.zeros((3, 3))
    matrix = AffinityMatrix(TASKS, source, "m")
    source[0, 0] = 5.0  # the caller's array is not the matrix's
    assert matrix.values[0, 0] == 0.0
    with pytest.raises(ValueError):
        matrix.values[0, 0] = 1.0
    with pytest.raises(AttributeError):
        matrix.method = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        matrix.meta["x"] = 1  # type: ignore[index]
    frame = matrix.frame()
    frame.iloc[0, 0] = 2.0  # the frame is a copy, writable
    assert matrix.values[0, 0] == 0.0


def test_bad_shapes_and_names():
    with pytest.raises(ValueError, match=r"shape \(2, 3\) for 3 tasks"):
        AffinityMatrix(TASKS, np.zeros((2, 3)), "m")
    with pytest.raises(ValueError, match="named twice: a"):
        AffinityMatrix(("a", "a", "b"), np.zeros((3, 3)), "m")
    with pytest.raises(ValueError, match="not numbers"):
        AffinityMatrix(TASKS, np.full((3, 3), "x"), "m")


def test_subset():
    matrix = example()
    sub = matrix.subset(["c", "a"])
    assert sub.tasks == ("c", "a") and sub.method == "gradient" and sub.meta["note"] == "x"
    np.testing.assert_array_equal(
        sub.values, [[matrix.values[2, 2], matrix.values[2, 0]], [matrix.values[0, 2], matrix.values[0, 0]]]
    )
    pd.testing.assert_frame_equal(sub.frame(), matrix.frame().loc[["c", "a"], ["c", "a"]])
    with pytest.raises(KeyError, match="'z'"):
        matrix.subset(["a", "z"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "not an affinity matrix"),
        ("task,a,b\na,1,2\nb,3,4\n", "first header cell"),
        ("source \\ target,a,b\na,1,2\nc,3,4\n", "rows and columns name different tasks"),
        ("source \\ target,a,b\na,1,high\nb,3,4\n", "column 'b' holds entries that are not numbers"),
        ('source \\ target,a,b\na,1,2\nb,3,4,5,6\n"', "not an affinity matrix"),
    ],
    ids=["empty", "header", "names", "words", "ragged"],
)
def test_a_malformed_file_is_named(tmp_path, text, message):
    path = tmp_path / "gradient" / "matrix.csv"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as caught:
        AffinityMatrix.from_csv(path)
    assert str(path) in str(caught.value)
    with pytest.raises(DataError, match=message) as caught:  # the search reads it the same way
        read_estimators([tmp_path])
    assert str(path) in str(caught.value)


def test_read_estimators_hands_out_matrices(tmp_path):
    for method in ("gradient", "lookahead"):
        (tmp_path / "run" / method).mkdir(parents=True)
        example(method).to_csv(tmp_path / "run" / method / "matrix.csv")
    found = read_estimators([tmp_path / "run"])
    assert sorted(found) == ["gradient", "lookahead"]
    assert all(isinstance(m, AffinityMatrix) and m.tasks == TASKS for m in found.values())
    np.testing.assert_array_equal(found["lookahead"].values, example().values)
    assert list(read_estimators([tmp_path / "run"], ["lookahead"])) == ["lookahead"]


def test_importing_it_imports_no_torch():
    code = "import sys, taskgroup.matrices; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_an_affinity_result_hands_out_its_matrices(tmp_path):
    from taskgroup.affinity.run import AffinityResult

    values = example().values
    result = AffinityResult(
        list(TASKS), {"gradient": values}, {"gradient": tmp_path}, {"gradient": {"gap": 1.0}}
    )
    (matrix,) = result.affinity_matrices().values()
    assert (matrix.tasks, matrix.method, matrix.quantity) == (TASKS, "gradient", "matrix")
    np.testing.assert_array_equal(matrix.values, values)
    assert matrix.meta == {"folder": str(tmp_path), "planted_separation": {"gap": 1.0}}
