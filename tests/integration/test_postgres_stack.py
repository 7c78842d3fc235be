"""The production stack's database, for real: `mlflow server` and `prefect server` on a throwaway
PostgreSQL cluster, as infra/ runs them; `genflow run`, the promotion gate, `genflow rollback` and
`genflow promote` against them; the registry checked through MLflow's REST API and the rows read
back from PostgreSQL itself.

The cluster (tests/integration/conftest.py `start_postgres`): initdb into a new temporary folder
(as the `postgres` account when the tests run as root), a free port on 127.0.0.1 with password
authentication, its unix socket inside that folder, one database per server (`mlflow`, `prefect`,
as infra/postgres/init-databases.sh makes them). The servers, then the cluster, are stopped and
the folder removed at the end of the module, also when a test failed; the teardown checks that no
process of either is left. Skipped, with the reason, where PostgreSQL is not installed.

Two runs of one tiny model: the first registers version 1 (champion: the first valid version), the
second trains 25 times longer, so the gate promotes version 2. The gate judges on
eval/bits_per_dim here, which longer training lowers for sure (the default metric, eval/fd on 30
samples, is too noisy at this size), and the sampling-speed guardrail is opened (timing on a busy
machine is not the point).
"""
import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest

from components.registry import CHALLENGER, CHAMPION, HISTORY_TAG, PREVIOUS
from conftest import TINY_OVERRIDES, make_clone
from integration.conftest import (
    alive,
    get_json,
    group_members,
    postgres_unavailable,
    start_mlflow_server,
    start_postgres,
    start_prefect_server,
)

pytestmark = pytest.mark.integration

KEY = "digits-gpt"
RUN_TIMEOUT_S = 600   # ~40 s a run on an idle machine
GATE = ["promotion.rules.digits-gpt.metric=eval/bits_per_dim", "promotion.max_sample_slowdown=100"]
FIRST = [*TINY_OVERRIDES, *GATE]
SECOND = [*FIRST, "models.digits-gpt.train.max_steps=150"]   # TINY_OVERRIDES train it 6 steps


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory):
    """A PostgreSQL cluster with an MLflow server and a Prefect server on it; all stopped at the end."""
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("pg-stack")
    cluster = start_postgres(("mlflow", "prefect"))
    pg_pids = [cluster.proc.pid, *group_members(cluster.proc.pid)]
    servers = []
    try:
        try:
            servers.append(start_mlflow_server(base / "mlflow", wait=False,
                                               backend_store_uri=cluster.url("mlflow")))
            servers.append(start_prefect_server(base / "prefect", wait=False,
                                                database_url=cluster.url("prefect", "postgresql+asyncpg")))
            for s in servers:
                s.wait_healthy()
            yield SimpleNamespace(pg=cluster, mlflow=servers[0], prefect=servers[1], base=base)
        finally:
            left = {s.name: s.stop() for s in servers}   # first: they hold connections to the cluster
            assert not any(left.values()), f"server processes left behind after stopping: {left}"
    finally:
        left = cluster.stop()
        assert left == [], f"PostgreSQL processes left behind after pg_ctl stop -m immediate: {left}"
        assert not cluster.folder.exists(), f"{cluster.folder}: the cluster's folder was not removed"
        assert not [p for p in pg_pids if alive(p)], f"PostgreSQL processes of the start left: {pg_pids}"


def genflow(stack, root: Path, *args: str) -> str:
    """`genflow ARGS` in the project, pointed at the two servers the way a user's shell does it."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": stack.mlflow.url, "PREFECT_API_URL": stack.prefect.url,
           "PREFECT_HOME": str(stack.base / "client-prefect-home"), "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    res = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=root, env=env,
                         capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    output = res.stdout + res.stderr
    assert res.returncode == 0, f"genflow {' '.join(args[:2])} failed (exit {res.returncode}):\n{output[-6000:]}"
    return output


def sets(overrides: list[str]) -> list[str]:
    return sum((["--set", o] for o in overrides), [])


def aliases(url: str) -> dict[str, str]:
    rm = get_json(f"{url}/api/2.0/mlflow/registered-models/get?" + urllib.parse.urlencode({"name": KEY}))
    return {a["alias"]: a["version"] for a in rm["registered_model"].get("aliases", [])}


def version(url: str, v: str) -> dict:
    mv = get_json(f"{url}/api/2.0/mlflow/model-versions/get?" + urllib.parse.urlencode({"name": KEY, "version": v}))
    mv = mv["model_version"]
    return {**mv, "tags": {t["key"]: t["value"] for t in mv.get("tags", [])}}


def history(tags: dict[str, str], prefix: str = HISTORY_TAG) -> list[dict]:
    """Alias events in tags `<prefix>NNN`, in their numbered order."""
    nums = sorted(int(k[len(prefix):]) for k in tags if k.startswith(prefix) and k[len(prefix):].isdigit())
    return [json.loads(tags[f"{prefix}{n:03d}"]) for n in nums]


@pytest.fixture(scope="module")
def story(pg_stack, project_root, tmp_path_factory):
    """run (version 1), run trained longer (version 2, promoted by the gate), rollback, promote 2;
    the aliases as the registry showed them after each step."""
    root = make_clone(project_root, tmp_path_factory.mktemp("pg-run") / "clone")
    url, seen, summaries, out = pg_stack.mlflow.url, {}, {}, {}
    for step, overrides in (("run1", FIRST), ("run2", SECOND)):
        out[step] = genflow(pg_stack, root, "run", "--only", KEY, "--quick", *sets(overrides))
        summaries[step] = json.loads((root / "reports" / "last_run.json").read_text())
        seen[step] = aliases(url)
    out["rollback"] = genflow(pg_stack, root, "rollback", KEY, *sets(FIRST))
    seen["rollback"] = aliases(url)
    out["promote"] = genflow(pg_stack, root, "promote", KEY, "2", "--reason", "back to the longer-trained one",
                             *sets(FIRST))
    seen["promote"] = aliases(url)
    return SimpleNamespace(**vars(pg_stack), root=root, seen=seen, summaries=summaries, out=out)


def test_runs_are_gated_and_recorded_in_postgresql(story):
    url = story.mlflow.url
    first, second = (story.summaries[s]["models"][KEY] for s in ("run1", "run2"))
    assert story.summaries["run1"]["status"] == story.summaries["run2"]["status"] == "completed"
    assert (first["status"], first["version"], first["aliases"]) == ("trained", "1", [CHAMPION])
    assert (second["status"], second["version"], second["aliases"]) == ("trained", "2", [CHAMPION])
    assert story.seen["run1"] == {CHAMPION: "1"}
    assert story.seen["run2"] == {CHAMPION: "2", PREVIOUS: "1"}

    # the gate's decision on version 2, with both values of its metric, longer training the better one
    v2 = version(url, "2")["tags"]
    assert v2["genflow.gate.decision"] == "promoted", v2.get("genflow.gate.reason")
    values = json.loads(v2["genflow.gate.values"])
    assert values["metric"] == "eval/bits_per_dim" and values["champion_version"] == "1"
    assert values["challenger"] < values["champion"]

    # both versions through the REST API, each from its own run
    found = get_json(f"{url}/api/2.0/mlflow/model-versions/search?"
                     + urllib.parse.urlencode({"filter": f"name='{KEY}'"}))["model_versions"]
    assert sorted(mv["version"] for mv in found) == ["1", "2"]
    assert len({mv["run_id"] for mv in found}) == 2 and all(mv["status"] == "READY" for mv in found)

    # Prefect: both flow runs completed
    flow_runs = get_json(f"{story.prefect.url}/flow_runs/filter",
                         {"flows": {"name": {"any_": ["genflow-retrain"]}}, "limit": 10})
    assert sorted(f["state_type"] for f in flow_runs) == ["COMPLETED", "COMPLETED"]

    # ... and all of it is in PostgreSQL, not in a file of the servers' folders
    pg = story.pg
    assert pg.sql("mlflow", f"SELECT version FROM model_versions WHERE name = '{KEY}' ORDER BY version") == [
        ("1",), ("2",)]
    assert pg.sql("prefect", "SELECT f.state_type FROM flow_run f JOIN flow ON flow.id = f.flow_id "
                             "WHERE flow.name = 'genflow-retrain'") == [("COMPLETED",), ("COMPLETED",)]
    assert {f["id"] for f in flow_runs} == {r[0] for r in pg.sql("prefect", "SELECT id FROM flow_run")}
    assert not list(story.mlflow.log.parent.glob("*.db")) and not list(story.prefect.log.parent.rglob("*.db"))


def test_rollback_and_promote_leave_one_champion_and_a_complete_history(story):
    url = story.mlflow.url
    assert "version 1 is champion again" in story.out["rollback"]
    assert story.seen["rollback"] == {CHAMPION: "1"}        # previous-champion cleared: no second rollback
    assert "version 2 is now champion" in story.out["promote"]
    assert story.seen["promote"] == {CHAMPION: "2", PREVIOUS: "1"} == aliases(url)
    assert story.pg.sql("mlflow", f"SELECT alias, version FROM registered_model_aliases WHERE name = '{KEY}' "
                                  "ORDER BY alias") == [(CHAMPION, "2"), (PREVIOUS, "1")]

    v1, v2 = version(url, "1"), version(url, "2")
    rolled = json.loads(v2["tags"]["genflow.rolled_back"])
    assert (rolled["champion"], rolled["demoted"]) == ("1", "2")
    assert json.loads(v2["tags"]["genflow.gate.values"])["by"] == "promote"   # the last decision on it

    # every move, in order, on each version: (alias, set/removed, by whom)
    moves = {v: [(e["alias"], e["action"], e["by"]) for e in history(mv["tags"])] for v, mv in (("1", v1), ("2", v2))}
    assert moves["1"] == [(CHALLENGER, "set", "register"), (CHAMPION, "set", "gate"), (CHALLENGER, "removed", "gate"),
                          (PREVIOUS, "set", "gate"), (CHAMPION, "removed", "gate"),
                          (CHAMPION, "set", "rollback"), (PREVIOUS, "removed", "rollback"),
                          (PREVIOUS, "set", "promote"), (CHAMPION, "removed", "promote")]
    assert moves["2"] == [(CHALLENGER, "set", "register"), (CHAMPION, "set", "gate"), (CHALLENGER, "removed", "gate"),
                          (CHAMPION, "removed", "rollback"), (CHAMPION, "set", "promote")]

    # replaying each version's history gives the aliases the registry holds now
    for v, mv in (("1", v1), ("2", v2)):
        held: set[str] = set()
        for e in history(mv["tags"]):
            (held.add if e["action"] == "set" else held.discard)(e["alias"])
        assert held == {a for a, holder in aliases(url).items() if holder == v}, v

    # the same history on each version's run, so it survives the version
    for v, mv in (("1", v1), ("2", v2)):
        run = get_json(f"{url}/api/2.0/mlflow/runs/get?" + urllib.parse.urlencode({"run_id": mv["run_id"]}))
        run_tags = {t["key"]: t["value"] for t in run["run"]["data"].get("tags", [])}
        assert history(run_tags, f"{HISTORY_TAG}v{v}.") == history(mv["tags"]), v
