"""The production stack on one machine: `genflow run` against a real MLflow server and a real
Prefect server, both on 127.0.0.1, checked only through their REST APIs.

`genflow run` runs once per module, as a subprocess whose environment a user's shell would set:
PREFECT_API_URL, MLFLOW_TRACKING_URI with `user:password@`, MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD; its params.yaml also carries a tracking.tracking_uri with a password.
One tiny model keeps it short. The first test checks what the servers recorded; the second
looks for the three passwords in the run's output, in everything the two servers stored
(databases, artifacts, logs) and in every file the run wrote. (The checks that need no server
are in tests/flows/test_security.py.)
"""
import json
import os
import secrets
import subprocess
import sys
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import TINY_OVERRIDES, make_clone
from integration.conftest import get_json

pytestmark = pytest.mark.integration

KEY = "digits-gpt"
RUN_TIMEOUT_S = 600  # ~40 s on an idle machine
# Drawn per session, so that no source file (the project's copy holds this one) contains them
URI_SECRET = "uri-pw-" + secrets.token_hex(6)        # in params.yaml's tracking.tracking_uri
ENV_URI_SECRET = "env-uri-pw-" + secrets.token_hex(6)  # in MLFLOW_TRACKING_URI
ENV_SECRET = "env-pw-" + secrets.token_hex(6)          # in MLFLOW_TRACKING_PASSWORD
HIDDEN = [URI_SECRET, ENV_URI_SECRET, ENV_SECRET]


def files_holding(folder: Path, needles: list[str], skip: tuple[str, ...] = ()) -> list[str]:
    """Files under folder whose bytes hold any needle (binary files too: SQLite pages, checkpoints)."""
    hits = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or p.is_symlink() or rel.startswith(skip):
            continue
        data = p.read_bytes()
        hits += [f"{rel}: {n}" for n in needles if n.encode() in data]
    return hits


@pytest.fixture(scope="module")
def stack_run(stack, project_root, tmp_path_factory):
    """One `genflow run --only digits-gpt` against the stack, the way a user starts it."""
    base = tmp_path_factory.mktemp("stack-run")
    root = make_clone(project_root, base / "clone")
    host = urllib.parse.urlsplit(stack["mlflow"].url).netloc
    params_file = root / "params.yaml"
    doc = yaml.safe_load(params_file.read_text())
    doc["tracking"]["tracking_uri"] = f"http://genflow:{URI_SECRET}@{host}"
    params_file.write_text(yaml.safe_dump(doc, sort_keys=False))

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://genflow:{ENV_URI_SECRET}@{host}",
           "MLFLOW_TRACKING_USERNAME": "genflow", "MLFLOW_TRACKING_PASSWORD": ENV_SECRET,
           "PREFECT_API_URL": stack["prefect"].url, "PREFECT_HOME": str(base / "client-prefect-home"),
           "PREFECT_LOGGING_TO_API_ENABLED": "true",  # the flow's log lines are stored by the server too
           "PREFECT_LOGGING_LEVEL": "DEBUG", "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    # `python -m flows.cli` in the clone: the clone's code, as the `genflow` script would run it
    res = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--only", KEY,
                          *sum((["--set", o] for o in TINY_OVERRIDES), [])],
                         cwd=root, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    output = res.stdout + res.stderr
    assert res.returncode == 0, f"genflow run failed:\n{output[-6000:]}"
    return SimpleNamespace(root=root, base=base, output=output, host=host,
                           mlflow=stack["mlflow"], prefect=stack["prefect"])


def mlflow_runs(url: str) -> list[dict]:
    exp = get_json(f"{url}/api/2.0/mlflow/experiments/get-by-name?"
                   + urllib.parse.urlencode({"experiment_name": "genflow-digits"}))["experiment"]
    return get_json(f"{url}/api/2.0/mlflow/runs/search",
                    {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]


def test_run_is_orchestrated_tracked_and_registered_on_the_servers(stack_run):
    mlflow_url, prefect_url, root = stack_run.mlflow.url, stack_run.prefect.url, stack_run.root
    summary = json.loads((root / "reports" / "last_run.json").read_text())
    assert summary["status"] == "completed"
    assert summary["models"][KEY]["status"] == "trained" and summary["models"][KEY]["version"] == "1"

    # Prefect: one flow run of genflow-retrain, COMPLETED, and its tasks too
    flow_runs = get_json(f"{prefect_url}/flow_runs/filter",
                         {"flows": {"name": {"any_": ["genflow-retrain"]}}, "limit": 10})
    assert len(flow_runs) == 1, flow_runs
    flow_run = flow_runs[0]
    assert flow_run["state_type"] == "COMPLETED" and flow_run["state"]["type"] == "COMPLETED"
    task_runs = get_json(f"{prefect_url}/task_runs/filter",
                         {"flow_runs": {"id": {"any_": [flow_run["id"]]}}, "limit": 50})
    assert {t["state_type"] for t in task_runs} == {"COMPLETED"}
    assert {"data", "train-evaluate-export", "register-promote"} <= {t["name"].rsplit("-", 1)[0] for t in task_runs}

    # MLflow: a pipeline run and the model's run nested under it, tagged with the Prefect flow run
    runs = mlflow_runs(mlflow_url)
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    pipeline = [rid for rid, t in tags.items() if t.get("genflow.kind") == "pipeline"]
    model = [rid for rid, t in tags.items() if t.get("genflow.model_key") == KEY]
    assert len(pipeline) == 1 and len(model) == 1, tags
    assert tags[model[0]]["mlflow.parentRunId"] == pipeline[0]
    for rid in (pipeline[0], model[0]):
        assert tags[rid]["genflow.flow_run_id"] == flow_run["id"]
    status = {r["info"]["run_id"]: r["info"]["status"] for r in runs}
    assert status[pipeline[0]] == status[model[0]] == "FINISHED"
    metrics = {m["key"] for r in runs if r["info"]["run_id"] == model[0] for m in r["data"].get("metrics", [])}
    assert {"train/loss", "eval/bits_per_dim", "perf/params"} <= metrics

    # Registry: version 1 from that run, champion alias on it
    rm = get_json(f"{mlflow_url}/api/2.0/mlflow/registered-models/get?"
                  + urllib.parse.urlencode({"name": KEY}))["registered_model"]
    assert {a["alias"]: a["version"] for a in rm.get("aliases", [])} == {"champion": "1"}
    mv = get_json(f"{mlflow_url}/api/2.0/mlflow/registered-models/alias?"
                  + urllib.parse.urlencode({"name": KEY, "alias": "champion"}))["model_version"]
    assert mv["version"] == "1" and mv["run_id"] == model[0]
    assert {t["key"]: t["value"] for t in mv.get("tags", [])}["genflow.flow_run_id"] == flow_run["id"]

    # Everything went to the servers: no local tracking store in the project
    assert not (root / ".genflow" / "mlflow.db").exists()
    assert not (root / "mlruns").exists() and not (root / "mlflow.db").exists()


def test_passwords_never_reach_output_params_tags_artifacts_or_logs(stack_run):
    run, host = stack_run, stack_run.host
    assert not [s for s in HIDDEN if s in run.output], "a password was printed"
    # MLflow prints its URL ("View run ... at: http://host/#/experiments/..."): with the host alone
    assert f"http://{host}/#/experiments/" in run.output

    # params.yaml's URI is logged as a pipeline param, its password as ***
    runs = mlflow_runs(run.mlflow.url)
    pipeline = [r for r in runs if {"key": "genflow.kind", "value": "pipeline"} in r["data"]["tags"]][0]
    assert {p["key"]: p["value"] for p in pipeline["data"]["params"]}["tracking.tracking_uri"] == f"http://***@{host}"
    values = [x["value"] for r in runs for x in r["data"].get("params", []) + r["data"].get("tags", [])]
    assert not [v for v in values if any(s in v for s in HIDDEN)]

    # The run summary as a Prefect markdown artifact, and the flow's logs on the Prefect server
    artifacts = get_json(f"{run.prefect.url}/artifacts/filter", {"artifacts": {"key": {"any_": ["retrain-summary"]}}})
    assert artifacts and KEY in artifacts[0]["data"]
    logs = get_json(f"{run.prefect.url}/logs/filter", {"limit": 200})
    assert logs, "the flow's log lines did not reach the Prefect server"
    assert not [s for s in HIDDEN if s in json.dumps(artifacts) + json.dumps(logs)]

    # Every byte the servers and the run stored: databases, artifacts (last_run.json, lineage,
    # checkpoints), server logs, reports, DVC files, the client's Prefect home
    assert files_holding(run.mlflow.log.parent, HIDDEN) == []
    assert files_holding(run.prefect.log.parent, HIDDEN) == []
    assert files_holding(run.root, HIDDEN, skip=("params.yaml",)) == []
    assert files_holding(run.base / "client-prefect-home", HIDDEN) == []


def test_schedule_serves_a_cron_deployment_on_the_server(stack_run):
    """`genflow schedule --cron` registers the retrain flow as a deployment with that cron on the
    Prefect server of PREFECT_API_URL and keeps serving it until stopped."""
    import time

    from integration.conftest import group_members, stop_group

    env = {**os.environ, "PREFECT_API_URL": stack_run.prefect.url, "PYTHONUNBUFFERED": "1",
           "PREFECT_HOME": str(stack_run.base / "schedule-prefect-home")}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "schedule", "--cron", "*/30 * * * *"],
                            cwd=stack_run.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deployment, deadline = None, time.monotonic() + 240
        while deployment is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(2)
            found = get_json(f"{stack_run.prefect.url}/deployments/filter", {})
            deployment = next((d for d in found if d["name"] == "nightly-retrain"), None)
        assert deployment is not None, proc.stdout.read() if proc.poll() is not None else "no deployment"
        crons = [s["schedule"].get("cron") for s in deployment.get("schedules", [])]
        assert crons == ["*/30 * * * *"]
        assert deployment["parameters"]["root"] == str(stack_run.root.resolve())
        assert proc.poll() is None   # still serving
    finally:
        left = stop_group(proc.pid, proc)
    assert left == [] and group_members(proc.pid) == []
