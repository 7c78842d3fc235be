"""The pieces of `genflow reproduce` that need no training: lineage checks, weight diffs, verdicts."""
import math
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from components.reproduce import (
    DIFFERENT,
    IDENTICAL,
    WITHIN,
    ReproduceError,
    check_lineage,
    judge,
    library_warnings,
    rebuild_placement,
    weight_diff,
)


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    for cmd in (["init", "-q"], ["add", "a.txt"], ["commit", "-qm", "a"]):
        subprocess.run(["git", "-C", str(tmp_path), *cmd], check=True, capture_output=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return tmp_path, head.stdout.strip()


def lineage(commit, **kw):
    tags = {"genflow.git_commit": commit, "genflow.git_dirty": "false", "genflow.dataset": "digits",
            "genflow.data_hash.digits.prepared": "0123abcd.dir"}
    return {**tags, **kw}


def test_a_complete_lineage_names_commit_dataset_and_data(repo):
    root, head = repo
    assert check_lineage("m", "1", lineage(head), root) == (head, "digits", "0123abcd.dir")


@pytest.mark.parametrize("change, message", [
    ({"genflow.git_dirty": "true", "genflow.git_dirty_files": "components/unet.py"},
     r"m:1: trained from a tree with uncommitted changes \(components/unet.py\)"),
    ({"genflow.git_commit": "f" * 40}, r"m:1: git commit ffffffffffff is not in the repository at .*git fetch"),
    ({"genflow.git_commit": "unknown"}, r"m:1: its lineage has no git commit"),
    ({"genflow.data_hash.digits.prepared": ""}, r"m:1: its lineage has no DVC hash for the prepared data of digits"),
])
def test_a_missing_piece_is_named_in_one_line(repo, change, message):
    root, head = repo
    with pytest.raises(ReproduceError, match=message) as e:
        check_lineage("m", "1", lineage(head, **change), root)
    assert "\n" not in str(e.value)


def save_graph(path, weights):
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), name) for name, v in weights.items()]
    first = next(iter(weights))
    node = helper.make_node("Add", ["x", first], ["y"])
    shape = list(np.asarray(weights[first]).shape)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], initializer=inits)
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_weight_diff_finds_the_largest_difference_and_the_tensor(tmp_path):
    a = save_graph(tmp_path / "a.onnx", {"w": [1.0, 2.0, 3.0], "b": [0.5]})
    same = save_graph(tmp_path / "same.onnx", {"w": [1.0, 2.0, 3.0], "b": [0.5]})
    moved = save_graph(tmp_path / "moved.onnx", {"w": [1.0, 2.25, 3.0], "b": [0.5]})
    other = save_graph(tmp_path / "other.onnx", {"w": [1.0, 2.0, 3.0], "c": [0.5]})
    assert weight_diff(a, same) == (0.0, [])
    assert weight_diff(a, moved) == (0.25, [("w", 0.25)])
    assert weight_diff(a, other)[0] == math.inf


def test_verdicts():
    assert judge(0.0, 1.5, 1.5, atol=1e-6, rtol=1e-4) == IDENTICAL
    assert judge(0.0, math.nan, math.nan, atol=1e-6, rtol=1e-4) == IDENTICAL
    assert judge(1e-7, 1.5, 1.50001, atol=1e-6, rtol=1e-4) == WITHIN
    assert judge(1e-3, 1.5, 1.5, atol=1e-6, rtol=1e-4) == DIFFERENT
    assert judge(0.0, 1.5, 1.6, atol=1e-6, rtol=1e-4) == DIFFERENT
    assert judge(0.0, 1.5, None, atol=1e-6, rtol=1e-4) == DIFFERENT


def test_across_devices_the_metric_decides_not_the_bits():
    # trained on a GPU, rebuilt on the CPU: weights drift apart, the metric must stay close
    assert judge(1e-2, 1.5, 1.52, atol=1e-6, rtol=1e-4, same_device=False, device_rtol=0.05) == WITHIN
    assert judge(1e-2, 1.5, 1.8, atol=1e-6, rtol=1e-4, same_device=False, device_rtol=0.05) == DIFFERENT
    assert judge(1e-2, 1.5, 1.52, atol=1e-6, rtol=1e-4) == DIFFERENT    # same device: no such leeway


def test_a_version_is_rebuilt_where_it_trained_or_on_the_cpu_with_a_warning():
    assert rebuild_placement({}, gpu_here=False) == ("cpu", "fp32", None)    # recorded before devices were
    assert rebuild_placement({"genflow.device": "cpu", "genflow.precision": "fp32"}, gpu_here=True) == \
        ("cpu", "fp32", None)
    gpu = {"genflow.device": "cuda:0", "genflow.precision": "bf16"}
    assert rebuild_placement(gpu, gpu_here=True) == ("cuda", "bf16", None)
    device, precision, warning = rebuild_placement(gpu, gpu_here=False)
    assert (device, precision) == ("cpu", "fp32")
    assert warning.startswith("the version was trained on cuda:0 in bf16") and "not bit for bit" in warning


def test_other_library_versions_are_warned_about():
    import torch

    here = torch.__version__.split("+")[0]
    tags = {"genflow.version.torch": "0.0.1", "genflow.version.numpy": np.__version__}
    warnings = library_warnings(tags)
    assert len(warnings) == 1 and warnings[0].startswith("torch ") and "trained with 0.0.1" in warnings[0]
    assert here in warnings[0]
