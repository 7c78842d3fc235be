"""Retraining when data arrives, against a real `prefect server` on 127.0.0.1.

A project clone with two user imagefolder datasets (`mine`, `theirs`) and the builtin digits, one
enabled model on each. prefect.yaml's `data-changed-retrain` deployment is registered with
`prefect deploy`, as a user would. Then `genflow watch --once`: the first look records the hashes
and emits nothing; a second look at unchanged folders emits nothing; after images are added to
`mine`, one look emits exactly one `genflow.data.changed` event, and the deployment's trigger
creates exactly one flow run of the retrain flow, with `only` = mine's model; a process worker
(`prefect worker start --run-once`) runs it to COMPLETED, and it trained mine's model and no other.
Checked through the server's REST API and the project's reports/last_run.json.

The models are tiny (TINY_OVERRIDES' U-Net settings): the worker's run takes ~50 s on 2 shared
cores, the whole test ~90 s.
"""
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY_OVERRIDES, make_clone, make_imagefolder
from integration.conftest import get_json

pytestmark = pytest.mark.integration

EVENT = "genflow.data.changed"
MODELS = {"mine-unet": "mine", "theirs-unet": "theirs", "digits-gpt": "digits"}
POLL_TIMEOUT_S = 120   # events are persisted and triggers act within seconds on an idle machine


def user_project(project_root: Path, base: Path) -> Path:
    """A clone whose params.yaml has the user datasets and one enabled model per dataset (the
    U-Nets tiny), and whose prefect.yaml pull step points at the clone instead of the image's /app."""
    root = make_clone(project_root, base / "clone")
    doc = yaml.safe_load((root / "params.yaml").read_text())
    for name in ("mine", "theirs"):
        make_imagefolder(base / name, {"a": 12, "b": 12}, size=(8, 8), seed=len(name))
        doc["datasets"][name] = {**copy.deepcopy(doc["datasets"]["digits"]), "source": f"imagefolder:{base / name}",
                                 "image_validation": {"min_per_class": 10}}
    for key, m in doc["models"].items():
        m["enabled"] = key in MODELS
    for key, dataset in MODELS.items():
        if key not in doc["models"]:
            doc["models"][key] = {**copy.deepcopy(doc["models"]["digits-unet"]), "dataset": dataset, "enabled": True}
            for override in TINY_OVERRIDES:
                path, _, value = override.partition("=")
                if path.startswith("models.digits-unet."):
                    *parents, leaf = path.split(".")[2:]
                    node = doc["models"][key]
                    for part in parents:
                        node = node.setdefault(part, {})
                    node[leaf] = yaml.safe_load(value)
    (root / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    deploy = yaml.safe_load((root / "prefect.yaml").read_text())
    deploy["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(root)}}]
    (root / "prefect.yaml").write_text(yaml.safe_dump(deploy, sort_keys=False))
    return root


def run(cmd: list[str], root: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    out = res.stdout[-3000:] + res.stderr[-3000:]
    assert res.returncode == 0, f"{' '.join(cmd[2:])} failed ({res.returncode}):\n{out}"
    return res


def events(api: str) -> list[dict]:
    return get_json(f"{api}/events/filter", {"filter": {"event": {"name": [EVENT]}}, "limit": 50})["events"]


def flow_runs(api: str) -> list[dict]:
    return get_json(f"{api}/flow_runs/filter", {"limit": 50})


def wait_for(what: str, probe, timeout: float = POLL_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not (found := probe()):
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s")
        time.sleep(0.5)
    return found


def test_added_images_trigger_one_retrain_of_that_datasets_models(prefect_server, project_root, tmp_path):
    api = prefect_server.url
    root = user_project(project_root, tmp_path)
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client-prefect-home"),
           "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI")   # the flow run tracks in the project's own store (.genflow/)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    prefect = [sys.executable, "-m", "prefect"]
    genflow_watch = [sys.executable, "-m", "flows.cli", "watch", "--once"]

    # the deployment of prefect.yaml, as `prefect deploy` registers it
    run([*prefect, "work-pool", "create", "genflow-pool", "--type", "process"], root, env)
    run([*prefect, "--no-prompt", "deploy", "--name", "data-changed-retrain"], root, env)
    (deployment,) = get_json(f"{api}/deployments/filter", {"limit": 10})
    assert deployment["name"] == "data-changed-retrain"
    (automation,) = get_json(f"{api}/automations/filter", {"limit": 10})
    assert automation["trigger"]["expect"] == [EVENT]

    # first look: recorded, nothing emitted; second look: unchanged, nothing emitted
    first = run(genflow_watch, root, env).stdout
    assert "watch: mine first seen (24 files" in first and "watch: digits first seen (builtin:digits)" in first
    second = run(genflow_watch, root, env).stdout.splitlines()
    assert second == ["watch: digits unchanged", "watch: mine unchanged", "watch: theirs unchanged"]
    before = yaml.safe_load((root / ".genflow" / "watch.json").read_text())

    # three images arrive in mine (class a: 12 -> 15)
    make_imagefolder(tmp_path / "mine", {"a": 15}, size=(8, 8), seed=9)
    third = run(genflow_watch, root, env).stdout.splitlines()
    assert third == ["watch: digits unchanged",
                     f"watch: mine changed (3 files added) -> event {EVENT} (retrain mine-unet)",
                     "watch: theirs unchanged"]
    after = yaml.safe_load((root / ".genflow" / "watch.json").read_text())

    (event,) = wait_for("genflow.data.changed event", lambda: events(api))
    assert event["resource"]["prefect.resource.id"] == "genflow.dataset.mine"
    assert event["payload"]["dataset"] == "mine" and event["payload"]["models"] == ["mine-unet"]
    assert (event["payload"]["old_hash"], event["payload"]["new_hash"]) == (before["mine"]["hash"],
                                                                            after["mine"]["hash"])

    (flow_run,) = wait_for("flow run created by the trigger", lambda: flow_runs(api))
    assert flow_run["deployment_id"] == deployment["id"]
    assert flow_run["parameters"]["only"] == ["mine-unet"]
    assert flow_run["state_type"] in ("SCHEDULED", "PENDING")   # waiting for a worker

    # a look at unchanged data afterwards: still one event and one flow run
    assert run(genflow_watch, root, env).stdout.splitlines() == second
    assert len(events(api)) == 1
    assert [r["id"] for r in flow_runs(api)] == [flow_run["id"]]

    # a process worker runs it: mine's model is trained, the others are not touched
    worker = run([*prefect, "worker", "start", "--pool", "genflow-pool", "--type", "process", "--run-once"],
                 root, env, timeout=600)
    (done,) = flow_runs(api)
    assert (done["id"], done["state_type"]) == (flow_run["id"], "COMPLETED"), \
        f"{done['state']['message']}\n{worker.stdout[-3000:]}{worker.stderr[-3000:]}"
    summary = yaml.safe_load((root / "reports" / "last_run.json").read_text())
    assert summary["status"] == "completed" and list(summary["models"]) == ["mine-unet"]
    assert summary["models"]["mine-unet"]["status"] == "trained"
    assert not (root / "models" / "theirs-unet").exists() and not (root / "models" / "digits-gpt").exists()
