"""Model registry: registration, the promotion gate, manual promotion, rollback, races, refusals.

Runs and versions go to the session's SQLite store (tests/conftest.py); every test registers its
own model key and experiment prefix, so tests do not see each other's aliases.
"""
import json
import multiprocessing
import os
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from components import registry, tracking
from components.config import DatasetConfig, ModelConfig, Params, PromotionRule
from components.registry import RegistryError

# ---------------------------------------------------------------------------
# Tiny inputs
# ---------------------------------------------------------------------------

def tiny_onnx(path: Path, seed: int = 0) -> Path:
    """y = x @ W + b, x: (batch, 4) -> y: (batch, 2): a Linear(4, 2) written with onnx.helper."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float32), "W")
    b = numpy_helper.from_array(np.zeros(2, np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_params(key: str, rule: PromotionRule = PromotionRule("eval/fd", "min", 0.02)) -> Params:
    p = Params(datasets={"digits": DatasetConfig(source="builtin:digits")},
               models={key: ModelConfig(family="diffusion", backbone="unet", dataset="digits")})
    p.promotion.rules[key] = rule
    p.tracking.experiment_prefix = f"reg-{key}"
    return p


class Model:
    """One registered model of a test: a fresh key, its params and a helper to add versions."""

    def __init__(self, root: Path, rule: PromotionRule = PromotionRule("eval/fd", "min", 0.02)):
        self.root = root
        self.key = f"m-{uuid.uuid4().hex[:8]}"
        self.params = make_params(self.key, rule)

    def add(self, value: float = 1.0, *, metric: str = "eval/fd", eval_hash: str = "h1", parity_ok: bool = True,
            sample_ms: float = 1.0, extra_files=()) -> str:
        hashes = {"digits": {"prepared": eval_hash}}
        with tracking.model_run(self.key, self.params, self.root, data_hashes=hashes) as run:
            metrics = {metric: value, "perf/sample_ms_per_item": sample_ms, "baseline/real_fd": 0.4,
                       "baseline/kde_fd": 1.3}
            tracking.log_metrics(metrics)
            lineage = tracking.lineage_tags(self.root, self.params, self.key, hashes, flow_run_id="fr-test")
            parity = {"max_abs": 2e-6 if parity_ok else 0.5, "passed": parity_ok}
            onnx_path = tiny_onnx(self.root / "exports" / self.key / f"model-{uuid.uuid4().hex[:4]}.onnx")
            return registry.register_onnx(self.key, onnx_path, run.info.run_id, metrics, lineage, parity,
                                          None, self.root, params=self.params, extra_files=extra_files)

    def aliases(self) -> dict:
        return registry.current_aliases(client(), self.key)


def client():
    import mlflow

    return mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def snapshot(key: str) -> tuple:
    """Everything a refused operation must leave unchanged: aliases, every version's tags and text."""
    c = client()
    versions = c.search_model_versions(f"name='{key}'")
    return (dict(c.get_registered_model(key).aliases),
            {v.version: (dict(v.tags), v.description) for v in versions})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



@pytest.fixture
def model(tmp_path):
    return Model(tmp_path)


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------

def test_register_tags_card_extras_and_challenger(model, tmp_path):
    import onnxruntime as ort

    decode = tiny_onnx(tmp_path / "decode.onnx", seed=3)
    config = tmp_path / "config.json"
    config.write_text('{"vocab": "ab"}')
    v1 = model.add(0.9, extra_files=[decode, config])
    v2 = model.add(0.8)  # the same flow twice: both versions must load (ModelProto mutation pitfall)
    assert (v1, v2) == ("1", "2")
    assert model.aliases() == {"challenger": "2"}

    c = client()
    mv = c.get_model_version(model.key, v1)
    t = mv.tags
    assert float(t["genflow.metric.eval/fd"]) == 0.9 and float(t["genflow.metric.baseline/real_fd"]) == 0.4
    assert float(t["genflow.parity_max_abs"]) == 2e-6 and t["genflow.parity_ok"] == "true"
    assert t["genflow.eval_data_hash"] == "h1" and t["genflow.data_hash.digits"] == "h1"
    assert t["genflow.model_key"] == model.key and t["genflow.family"] == "diffusion"
    assert t["genflow.flow_run_id"] == "fr-test" and t["genflow.git_commit"]
    assert t["genflow.params_hash"] == model.params.section_hash("models", model.key)
    assert json.loads(t["genflow.extra_files"]) == ["extras/decode.onnx", "extras/config.json"]
    # the card: data hashes, metrics next to the floor and baselines, limits; also a run artifact
    assert mv.description.startswith(f"# {model.key} — version 1")
    assert "| eval/fd | 0.9 | 0.4 | kde 1.3 |" in mv.description
    assert "evaluation data hash: `h1`" in mv.description and "## Intended use and limits" in mv.description
    run_files = {a.path for a in c.list_artifacts(mv.run_id)}
    assert {"model_card.md", "extras"} <= run_files
    # history: challenger set on v1, then moved to v2 (both versions record it)
    h1 = registry.alias_history(model.key, v1, tmp_path)
    assert [(e["alias"], e["action"]) for e in h1] == [("challenger", "set"), ("challenger", "removed")]
    assert h1[1]["new_holder"] == "2"

    # a sampler can fetch the registered graph and its extras; both versions run and agree with the file
    x = np.ones((3, 4), np.float32)
    fetched = {v: registry.fetch_version(model.key, v, tmp_path, tmp_path / f"fetched-{v}") for v in (v1, v2)}
    for files in fetched.values():
        sess = ort.InferenceSession(str(files["model.onnx"]), providers=["CPUExecutionProvider"])
        assert sess.run(None, {"x": x})[0].shape == (3, 2)
    files = fetched[v1]
    assert set(files) == {"model.onnx", "decode.onnx", "config.json"}
    assert json.loads(files["config.json"].read_text()) == {"vocab": "ab"}


def test_register_model_reads_exports_and_run_lineage_and_find_version(tmp_path, model):
    export = tmp_path / "exports" / model.key
    tiny_onnx(export / "model.onnx")
    tiny_onnx(export / "decode.onnx", seed=1)
    (export / "parity.json").write_text('{"max_abs": 1e-6, "passed": true}')
    hashes = {"digits": {"prepared": "h9"}}
    with tracking.model_run(model.key, model.params, tmp_path, data_hashes=hashes) as run:
        pass
    # the pipeline registers in a later step, after the model's run has ended
    v = registry.register_model(model.key, run.info.run_id, {"eval/fd": 0.7}, {"max_abs": 1e-6, "passed": True},
                                model.params, tmp_path, inputs_hash="ih-1")
    assert client().get_run(run.info.run_id).info.status == "FINISHED"
    tags = client().get_model_version(model.key, v).tags
    assert tags["genflow.eval_data_hash"] == "h9" and tags["genflow.inputs_hash"] == "ih-1"
    assert json.loads(tags["genflow.extra_files"]) == ["extras/decode.onnx"]  # not parity.json
    found = registry.find_version(model.key, {"genflow.inputs_hash": "ih-1"}, tmp_path)
    assert found["version"] == v and found["metrics"]["eval/fd"] == 0.7
    assert found["aliases"] == ["challenger"] and found["parity_max_abs"] == 1e-6
    assert registry.find_version(model.key, {"genflow.inputs_hash": "other"}, tmp_path) is None
    assert registry.find_version("no-such-model", {}, tmp_path) is None
    with pytest.raises(RegistryError, match="no ONNX file"):
        registry.register_onnx(model.key, tmp_path / "missing.onnx", run.info.run_id, {}, {}, {}, None, tmp_path)


# ---------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------

def test_gate_first_version_then_rule_and_history(model, tmp_path):
    p, key = model.params, model.key
    d1 = registry.gate(key, model.add(1.0), p, tmp_path)
    assert d1.promoted and d1.reason.startswith("first valid version")
    assert model.aliases() == {"champion": "1"}  # challenger left the promoted version

    v2 = model.add(0.99)  # 1% better; the rule wants 2%
    d2 = registry.gate(key, v2, p, tmp_path)
    assert not d2.promoted and "not better enough" in d2.reason
    assert (d2.challenger_value, d2.champion_value, d2.champion_version) == (0.99, 1.0, "1")
    assert model.aliases() == {"champion": "1", "challenger": "2"}  # a rejected version stays challenger
    t2 = client().get_model_version(key, v2).tags
    assert t2["genflow.gate.decision"] == "rejected" and t2["genflow.gate.reason"] == d2.reason
    values = json.loads(t2["genflow.gate.values"])
    assert (values["metric"], values["challenger"], values["champion"]) == ("eval/fd", 0.99, 1.0)

    v3 = model.add(0.5)
    d3 = registry.gate(key, v3, p, tmp_path)
    assert d3.promoted and "better" in d3.reason and d3.champion_version == "1"
    assert model.aliases() == {"champion": "3", "previous-champion": "1"}
    mv3 = client().get_model_version(key, v3)
    run = client().get_run(mv3.run_id)
    assert run.data.tags["genflow.gate.decision"] == "promoted"
    assert (run.data.tags["genflow.gate.challenger"], run.data.tags["genflow.gate.champion"]) == ("0.5", "1.0")
    gate_files = [a.path for a in client().list_artifacts(mv3.run_id, "gate")]
    assert len(gate_files) == 1
    record = json.loads(Path(client().download_artifacts(mv3.run_id, gate_files[0], str(tmp_path))).read_text())
    assert record["promoted"] and record["challenger_value"] == 0.5 and record["champion_value"] == 1.0
    # alias history on the old champion survives the moves, in order, also on its run
    h1 = registry.alias_history(key, "1", tmp_path)
    assert [(e["alias"], e["action"]) for e in h1] == [
        ("challenger", "set"), ("champion", "set"), ("challenger", "removed"),
        ("previous-champion", "set"), ("champion", "removed")]
    run1 = client().get_run(client().get_model_version(key, "1").run_id)
    assert sorted(k for k in run1.data.tags if k.startswith("genflow.alias_history.")) == [
        f"genflow.alias_history.v1.{n:03d}" for n in range(1, 6)]
    # gating the champion again changes nothing, not even its decision tags
    before = snapshot(key)
    again = registry.gate(key, v3, p, tmp_path)
    assert not again.promoted and "already champion" in again.reason
    assert snapshot(key) == before


def test_gate_guardrails_parity_speed_and_missing_metric(model, tmp_path):
    p, key = model.params, model.key
    bad = model.add(0.1, parity_ok=False)
    d = registry.gate(key, bad, p, tmp_path)
    assert not d.promoted and "parity" in d.reason
    assert "champion" not in model.aliases()  # a failed-parity version never becomes the first champion
    registry.gate(key, model.add(1.0), p, tmp_path)
    slow = model.add(0.5, sample_ms=1.3)  # 30% slower, 25% allowed
    d = registry.gate(key, slow, p, tmp_path)
    assert not d.promoted and "slower" in d.reason and d.challenger_value == 0.5
    ok = model.add(0.5, sample_ms=1.2)
    assert registry.gate(key, ok, p, tmp_path).promoted
    other = model.add(0.1, metric="eval/kid")  # no eval/fd on this version
    d = registry.gate(key, other, p, tmp_path)
    assert not d.promoted and "has no eval/fd" in d.reason
    assert model.aliases()["champion"] == ok


def test_gate_compares_only_on_the_same_eval_data(model, tmp_path):
    p, key = model.params, model.key
    registry.gate(key, model.add(1.0, eval_hash="old"), p, tmp_path)
    v2 = model.add(0.5, eval_hash="new")
    d = registry.gate(key, v2, p, tmp_path)
    assert not d.promoted and "evaluation data differ" in d.reason and "re-evaluate the champion" in d.reason
    assert model.aliases()["champion"] == "1"
    d = registry.gate(key, v2, p, tmp_path, champion_metrics_on_new_data={"eval/fd": 0.45})
    assert not d.promoted and d.champion_value == 0.45  # on the new data the champion is better
    d = registry.gate(key, v2, p, tmp_path, champion_metrics_on_new_data={"eval/fd": 0.8})
    assert d.promoted and "re-evaluated" in d.reason
    assert model.aliases() == {"champion": "2", "previous-champion": "1"}


def test_gate_direction_max(tmp_path):
    m = Model(tmp_path, PromotionRule("eval/class_acc", "max", 0.0))
    registry.gate(m.key, m.add(0.90, metric="eval/class_acc"), m.params, tmp_path)
    assert not registry.gate(m.key, m.add(0.85, metric="eval/class_acc"), m.params, tmp_path).promoted
    assert not registry.gate(m.key, m.add(0.90, metric="eval/class_acc"), m.params, tmp_path).promoted  # a tie
    assert registry.gate(m.key, m.add(0.91, metric="eval/class_acc"), m.params, tmp_path).promoted
    assert m.aliases()["champion"] == "4"


# ---------------------------------------------------------------------------
# Manual promotion, rollback, refusals
# ---------------------------------------------------------------------------

def test_promote_and_rollback_keep_history(model, tmp_path):
    p, key = model.params, model.key
    registry.gate(key, model.add(1.0), p, tmp_path)
    v2 = model.add(2.0)  # worse, but a person decides
    d = registry.promote(key, v2, "hotfix for users", p, tmp_path)
    assert d.promoted and d.reason == "manual: hotfix for users" and d.champion_value == 1.0
    assert model.aliases() == {"champion": "2", "previous-champion": "1"}
    t2 = client().get_model_version(key, v2).tags
    assert json.loads(t2["genflow.gate.values"])["by"] == "promote" and t2["genflow.gate.reason"] == d.reason

    assert registry.rollback(key, tmp_path, reason="bad samples") == "1"
    assert model.aliases() == {"champion": "1"}
    assert registry.aliases_of(key, "1", tmp_path) == ["champion"] and registry.aliases_of(key, v2, tmp_path) == []
    t2 = client().get_model_version(key, v2).tags
    rolled = json.loads(t2["genflow.rolled_back"])
    assert rolled["champion"] == "1" and rolled["reason"] == "bad samples"
    last = registry.alias_history(key, v2, tmp_path)[-1]
    assert (last["alias"], last["action"], last["by"], last["new_holder"]) == ("champion", "removed", "rollback", "1")
    before = snapshot(key)
    with pytest.raises(RegistryError, match="no previous-champion") as e:
        registry.rollback(key, tmp_path)
    assert "\n" not in str(e.value) and f"genflow promote {key} VERSION" in str(e.value)
    assert snapshot(key) == before
    # a version given by alias or as key/number works too
    assert registry.promote(key, f"{key}/{v2}", "again", p, tmp_path).promoted
    assert model.aliases() == {"champion": "2", "previous-champion": "1"}


def test_refusals_change_nothing(model, tmp_path, monkeypatch):
    p, key = model.params, model.key
    registry.gate(key, model.add(1.0), p, tmp_path)
    bad = model.add(0.5, parity_ok=False)
    other = Model(tmp_path)
    other.add(1.0)
    before = snapshot(key)
    other_before = snapshot(other.key)

    cases = [
        (lambda: registry.promote(key, "99", "", p, tmp_path), "no version or alias '99'"),
        (lambda: registry.promote(key, bad, "", p, tmp_path), "parity failed"),
        (lambda: registry.promote(key, f"{other.key}/1", "", p, tmp_path), f"belongs to model {other.key}"),
        (lambda: registry.promote(key, "previous-champion", "", p, tmp_path), "no version or alias"),
        (lambda: registry.gate(key, "42", p, tmp_path), "no version or alias '42'"),
        (lambda: registry.promote("no-such-model", "1", "", p, tmp_path), "no registered model"),
        (lambda: registry.rollback(key, tmp_path), "no previous-champion"),
    ]
    for call, message in cases:
        with pytest.raises(RegistryError, match=message) as e:
            call()
        assert "\n" not in str(e.value) and isinstance(e.value, ValueError)
        assert snapshot(key) == before and snapshot(other.key) == other_before

    # a version whose tags say it was registered for another model is refused too
    client().set_model_version_tag(other.key, "1", "genflow.model_key", key)
    other_before = snapshot(other.key)
    with pytest.raises(RegistryError, match=f"registered for model {key}"):
        registry.promote(other.key, "1", "", other.params, tmp_path)
    assert snapshot(other.key) == other_before

    # an unreachable tracking server: one clear line, nothing changed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("GENFLOW_TRACKING_RETRIES", "1")
    with pytest.raises(tracking.TrackingUnavailable, match="cannot reach MLflow at http://127.0.0.1"):
        registry.promote(key, "1", "", p, tmp_path)
    with pytest.raises(tracking.TrackingUnavailable):
        registry.rollback(key, tmp_path)
    monkeypatch.undo()
    assert snapshot(key) == before


def test_models_table_and_format(model, tmp_path):
    registry.gate(model.key, model.add(0.75), model.params, tmp_path)
    model.add(0.9)
    rows = {r["model"]: r for r in registry.models_table(tmp_path, model.params)}
    row = rows[model.key]
    assert row["versions"] == 2 and row["champion"] == "1" and row["value"] == 0.75
    assert row["aliases"] == "champion=1, challenger=2" and row["metric"] == "eval/fd" and row["updated"]
    # without params the champion's recorded gate metric is used
    assert {r["model"]: r for r in registry.models_table(tmp_path)}[model.key]["metric"] == "eval/fd"
    text = registry.format_table([row])
    lines = text.splitlines()
    assert lines[0].split() == ["model", "versions", "aliases", "champion", "metric", "updated"]
    assert model.key in lines[1] and "champion=1, challenger=2" in lines[1] and "eval/fd 0.75" in lines[1]
    assert "no registered models" in registry.format_table([])


# ---------------------------------------------------------------------------
# Two promotions at once
# ---------------------------------------------------------------------------

def race(target, arg_lists: list[tuple], timeout: float = 300) -> list[tuple]:
    """Start one spawned process per argument tuple, all released at once by a barrier (appended
    to each tuple with the results queue); their reports, in the order they finished."""
    ctx = multiprocessing.get_context("spawn")  # a forked child would share the parent's SQLite connections
    barrier, results = ctx.Barrier(len(arg_lists)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for args in arg_lists]
    for proc in procs:
        proc.start()
    try:
        return [results.get(timeout=timeout) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def _promote_in_child(key, version, root, params, barrier, results):
    from components import registry as reg

    reg.aliases_of(key, version, root)  # open the store before the race starts
    barrier.wait(timeout=120)
    try:
        results.put((version, "ok", reg.promote(key, version, "race", params, root).reason))
    except Exception as e:  # reported to the parent, which fails the test with it
        results.put((version, "error", f"{type(e).__name__}: {e}"))


def test_two_concurrent_promotions_leave_one_champion_and_a_consistent_history(model, tmp_path):
    p, key = model.params, model.key
    registry.gate(key, model.add(1.0), p, tmp_path)
    v2, v3 = model.add(0.9), model.add(0.8)
    outcomes = race(_promote_in_child, [(key, v, tmp_path, p) for v in (v2, v3)], timeout=180)
    assert all(status == "ok" for _, status, _ in outcomes), outcomes

    aliases = model.aliases()
    champion = aliases["champion"]
    assert champion in (v2, v3)
    loser = v3 if champion == v2 else v2
    assert aliases["previous-champion"] == loser  # the promotions ran one after the other
    events = {v: registry.alias_history(key, v, tmp_path) for v in ("1", v2, v3)}
    for v, history in events.items():  # numbered events, none lost or written twice
        tags = client().get_model_version(key, v).tags
        numbers = sorted(int(k.rsplit(".", 1)[1]) for k in tags if k.startswith("genflow.alias_history."))
        assert numbers == list(range(1, len(history) + 1))
    champion_moves = [e for h in events.values() for e in h if e["alias"] == "champion" and e["action"] == "set"]
    assert len(champion_moves) == 3  # v1 first, then each racer exactly once
    assert [e["action"] for e in events[champion] if e["alias"] == "champion"][-1] == "set"
    assert [(e["alias"], e["action"]) for e in events[loser][-2:]] == [("previous-champion", "set"),
                                                                       ("champion", "removed")]
    last_of_v1 = events["1"][-1]
    assert (last_of_v1["alias"], last_of_v1["action"]) == ("previous-champion", "removed")


# ---------------------------------------------------------------------------
# Promotions from several machines: no shared file lock, one registry
# ---------------------------------------------------------------------------

def test_promotions_from_several_machines_leave_one_champion_and_a_complete_history(model, tmp_path):
    """Each process has a project folder of its own (its own .genflow/locks, as on another machine)
    and shares only the SQLite-backed registry: the registry lease alone serialises the moves."""
    p, key = model.params, model.key
    registry.gate(key, model.add(1.0), p, tmp_path)
    racers = [model.add(0.9 - i / 10) for i in range(4)]
    outcomes = race(_promote_in_child, [(key, v, tmp_path / f"machine-{v}", p) for v in racers])
    assert all(status == "ok" for _, status, _ in outcomes), outcomes

    aliases = model.aliases()
    assert aliases["champion"] in racers and "challenger" not in aliases
    events = {v: registry.alias_history(key, v, tmp_path) for v in ["1", *racers]}
    for v, history in events.items():   # numbered events, none lost or overwritten by another machine
        tags = client().get_model_version(key, v).tags
        numbers = sorted(int(k.rsplit(".", 1)[1]) for k in tags if k.startswith("genflow.alias_history."))
        assert numbers == list(range(1, len(history) + 1)), (v, history)
    # the champion moves form one chain: v1, then each racer once, each replacing the one before
    moves = {e["version"]: e["previous_holder"] for h in events.values() for e in h
             if e["alias"] == "champion" and e["action"] == "set"}
    assert len(moves) == 1 + len(racers) and moves["1"] is None
    chain, at = [], aliases["champion"]
    while at is not None:
        chain.append(at)
        at = moves[at]
    assert sorted(chain) == sorted(["1", *racers]) and chain[-1] == "1"
    assert aliases["previous-champion"] == chain[1]
    assert not [m.name for m in client().search_registered_models() if m.name.startswith("genflow-lease.")]


def test_a_lease_left_by_a_dead_client_is_taken_over_once_expired(model, tmp_path):
    from components.registry.lease import lease_name

    p, key = model.params, model.key
    registry.gate(key, model.add(1.0), p, tmp_path)
    v2 = model.add(0.5)
    client().create_registered_model(lease_name(key), tags={"genflow.lease.owner": "gone:1:x",
                                                            "genflow.lease.expires": "1"})   # expired long ago
    assert lease_name(key) not in [r["model"] for r in registry.models_table(tmp_path, p)]   # not a model
    assert registry.promote(key, v2, "after a crash", p, tmp_path).promoted
    assert model.aliases()["champion"] == v2
    assert not client().search_registered_models(f"name='{lease_name(key)}'")


def test_a_lease_of_a_killed_process_of_this_machine_is_taken_over_at_once(model, tmp_path):
    import subprocess
    import sys

    from components.registry.lease import lease_name

    p, key = model.params, model.key
    registry.gate(key, model.add(1.0), p, tmp_path)
    v2 = model.add(0.5)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()   # a pid of this machine that is gone
    owner = f"{socket.gethostname()}:{dead}:x"
    client().create_registered_model(lease_name(key), tags={"genflow.lease.owner": owner,
                                                            "genflow.lease.expires": "9e12"})   # not expired
    t0 = time.monotonic()
    assert registry.promote(key, v2, "after a SIGKILL", p, tmp_path).promoted
    assert time.monotonic() - t0 < 60   # no wait for the lease to expire (it never would here)


def test_an_alias_moved_by_a_killed_process_gets_its_history_on_the_next_move(model, tmp_path):
    p, key = model.params, model.key
    v1 = model.add(1.0)
    registry.gate(key, v1, p, tmp_path)
    v2 = model.add(0.5)
    client().set_registered_model_alias(key, "previous-champion", v1)   # moved; killed before the history
    registry.promote(key, v2, "next move", p, tmp_path)
    for v, alias, actions in ((v1, "previous-champion", ["set"]), (v1, "champion", ["set", "removed"]),
                              (v2, "champion", ["set"])):
        assert [e["action"] for e in registry.alias_history(key, v, tmp_path, p) if e["alias"] == alias] == actions
    [repair] = [e for e in registry.alias_history(key, v1, tmp_path, p) if e["by"] == "repair"]
    assert repair["alias"] == "previous-champion" and "killed" in repair["reason"]


def test_a_lease_dropped_while_a_waiter_learns_of_the_clash_is_retried_not_raised(model, monkeypatch):
    """The SQL store answers a name clash by reading the existing model for its message; when the
    holder drops the lease in that window the read fails with RESOURCE_DOES_NOT_EXIST (seen in a
    four-machine race). The waiter must take that as 'held a moment ago' and try again."""
    from components.registry import lease

    c = client()
    name = lease.lease_name(model.key)
    c.create_registered_model(name, tags={"genflow.lease.owner": "other:1:x", "genflow.lease.expires": "9e12"})
    store = c._get_registry_client().store
    real_get = type(store).get_registered_model
    dropped = []

    def get_after_the_holder_dropped_it(self, n):   # the holder's delete lands inside the clash handling
        if n == name and not dropped:
            dropped.append(n)
            c.delete_registered_model(n)
        return real_get(self, n)

    monkeypatch.setattr(type(store), "get_registered_model", get_after_the_holder_dropped_it)
    with lease.registry_lease(c, model.key):
        assert c.get_registered_model(name).tags["genflow.lease.owner"] != "other:1:x"
    assert dropped == [name]
    assert not c.search_registered_models(f"name='{name}'")


def _move_in_child(uri, key, action, version, root, params, barrier, results):
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from components import registry as reg

    reg.current_aliases(reg.registry_client(root, params), key)  # connect before the race starts
    barrier.wait(timeout=120)
    try:
        if action == "promote":
            results.put((action, version, "ok", reg.promote(key, version, "race", params, root).reason))
        else:
            results.put((action, version, "ok", reg.rollback(key, root, "race", params)))
    except RegistryError as e:   # a refusal, e.g. a rollback that found no previous champion: nothing changed
        results.put((action, version, "refused", str(e)))
    except Exception as e:  # reported to the parent, which fails the test with it
        results.put((action, version, "error", f"{type(e).__name__}: {e}"))


@pytest.mark.integration
def test_promotions_and_rollbacks_from_several_machines_against_one_mlflow_server(tmp_path, monkeypatch):
    """Six processes, each with a project folder of its own (as on six machines), promote or roll
    back one model at once through a real `mlflow server`: every move is whole, one champion holds,
    and each version's numbered alias history replays to the aliases the server holds."""
    from integration.conftest import start_mlflow_server

    server = start_mlflow_server(tmp_path / "server")
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        model = Model(tmp_path)
        p, key = model.params, model.key
        registry.gate(key, model.add(1.0), p, tmp_path)
        registry.promote(key, model.add(0.95), "so that a previous champion exists", p, tmp_path)
        versions = [model.add(0.9 - i / 10) for i in range(4)]
        moves = [("promote", v) for v in versions] + [("rollback", None), ("rollback", None)]
        outcomes = race(_move_in_child, [(server.url, key, action, v, tmp_path / f"machine-{i}", p)
                                         for i, (action, v) in enumerate(moves)])
        assert not [o for o in outcomes if o[2] == "error"], outcomes
        assert all(o[2] == "ok" for o in outcomes if o[0] == "promote"), outcomes
        assert all("previous" in o[3] for o in outcomes if o[2] == "refused"), outcomes

        aliases = model.aliases()
        assert aliases["champion"] in ["1", "2", *versions] and "challenger" not in aliases
        for v in ["1", "2", *versions]:
            history = registry.alias_history(key, v, tmp_path)
            tags = client().get_model_version(key, v).tags
            numbers = sorted(int(k.rsplit(".", 1)[1]) for k in tags if k.startswith("genflow.alias_history."))
            assert numbers == list(range(1, len(history) + 1)), (v, history)   # none lost or overwritten
            held: set[str] = set()
            for e in history:
                (held.add if e["action"] == "set" else held.discard)(e["alias"])
            assert held == {a for a, holder in aliases.items() if holder == v}, (v, history, aliases)
        assert not [m.name for m in client().search_registered_models() if m.name.startswith("genflow-lease.")]
    finally:
        server.stop()
