"""Tracking and registry against a real `mlflow server` on 127.0.0.1 (SQLite + artifacts in tmp).

The `mlflow_server` fixture (tests/integration/conftest.py) starts the server (one worker, no job
runners: ~12 s to healthy) and stops it, with its whole process group, in its teardown.
"""
import urllib.parse
import uuid
from pathlib import Path

import numpy as np
import pytest

from components import registry, tracking
from components.config import DatasetConfig, ModelConfig, Params, PromotionRule
from components.registry import RegistryError
from integration.conftest import get_json

pytestmark = pytest.mark.integration


def tiny_onnx(path: Path, seed: int) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((4, 2)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def test_register_gate_promote_rollback_through_a_server(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    key = f"srv-{uuid.uuid4().hex[:6]}"
    params = Params(datasets={"digits": DatasetConfig(source="builtin:digits")},
                    models={key: ModelConfig(family="diffusion", backbone="unet", dataset="digits")})
    params.promotion.rules[key] = PromotionRule("eval/fd", "min", 0.02)
    hashes = {"digits": {"prepared": "h1"}}

    def aliases_via_rest() -> dict:
        q = urllib.parse.urlencode({"name": key})
        doc = get_json(f"{mlflow_server}/api/2.0/mlflow/registered-models/get?{q}")
        return {a["alias"]: a["version"] for a in doc["registered_model"].get("aliases", [])}

    versions = []
    with tracking.pipeline_run(params, tmp_path, flow_run_id="fr-srv", models=[key], data_hashes=hashes) as parent:
        for i, fd in enumerate((1.0, 0.5)):
            with tracking.model_run(key, params, tmp_path, parent_run_id=parent.info.run_id) as run:
                metrics = {"eval/fd": fd, "perf/sample_ms_per_item": 1.0}
                tracking.log_metrics(metrics)
                lineage = tracking.lineage_tags(tmp_path, params, key, hashes, "fr-srv")
                versions.append(registry.register_onnx(
                    key, tiny_onnx(tmp_path / f"m{i}.onnx", i), run.info.run_id, metrics, lineage,
                    {"max_abs": 1e-6, "passed": True}, {"x": np.ones((2, 4), np.float32)}, tmp_path, params=params))
            if i == 0:
                assert registry.gate(key, versions[0], params, tmp_path).promoted
                assert aliases_via_rest() == {"champion": "1"}
        tracking.log_summary({"status": "completed", "seconds": 1.0}, tmp_path)
    assert versions == ["1", "2"]
    assert aliases_via_rest() == {"champion": "1", "challenger": "2"}

    d = registry.gate(key, "2", params, tmp_path)
    assert d.promoted and (d.challenger_value, d.champion_value) == (0.5, 1.0)
    assert aliases_via_rest() == {"champion": "2", "previous-champion": "1"}
    q = urllib.parse.urlencode({"name": key, "version": "2"})
    mv = get_json(f"{mlflow_server}/api/2.0/mlflow/model-versions/get?{q}")["model_version"]
    tags = {t["key"]: t["value"] for t in mv["tags"]}
    assert tags["genflow.gate.decision"] == "promoted" and tags["genflow.eval_data_hash"] == "h1"
    assert tags["genflow.flow_run_id"] == "fr-srv" and mv["description"].startswith(f"# {key} — version 2")

    with pytest.raises(RegistryError, match="no version or alias '7'"):
        registry.promote(key, "7", "", params, tmp_path)
    assert registry.rollback(key, tmp_path, reason="integration check") == "1"
    assert aliases_via_rest() == {"champion": "1"}
    with pytest.raises(RegistryError, match="no previous-champion"):
        registry.rollback(key, tmp_path)
    assert aliases_via_rest() == {"champion": "1"}
    history = registry.alias_history(key, "2", tmp_path)
    assert history[-1]["alias"] == "champion" and history[-1]["action"] == "removed"
    assert [r["model"] for r in registry.models_table(tmp_path, params)] == [key]

    # the model and its artifacts went to the server, never into the working directory
    files = registry.fetch_version(key, "champion", tmp_path, tmp_path / "fetched")
    assert files["model.onnx"].is_file()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / ".genflow" / "mlartifacts").exists()
