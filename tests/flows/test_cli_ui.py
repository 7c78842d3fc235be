"""`genflow ui` serves the MLflow UI of the project's own store; `genflow schedule` refuses what
it cannot serve, in one line."""
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from flows.cli import main
from integration.conftest import free_port, group_members, stop_group


@pytest.mark.integration
def test_genflow_ui_serves_the_mlflow_ui_of_the_project_store(project_clone):
    port = free_port()
    env = {**os.environ, "MLFLOW_WORKERS": "1",            # what a user on a small machine would set:
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # ~12 s to healthy instead of ~47 s
    env.pop("MLFLOW_TRACKING_URI")  # the project's default store, .genflow/mlflow.db
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--port", str(port)], cwd=project_clone,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # one killpg stops genflow and the server it started
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        first = lines.get(timeout=120)
        m = re.fullmatch(r"MLflow UI for (\S+) at (http://\S+) \(Ctrl-C to stop\)\n", first)
        assert m, first
        store, url = m.groups()
        assert store == f"sqlite:///{project_clone / '.genflow' / 'mlflow.db'}"
        assert url == f"http://127.0.0.1:{port}"

        deadline, page = time.monotonic() + 240, None
        while page is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    page = (r.status, r.headers.get_content_type(), r.read().decode(errors="replace"))
            except OSError:
                assert proc.poll() is None, "genflow ui exited:\n" + "".join(lines.queue)
                assert time.monotonic() < deadline, "the UI did not answer:\n" + "".join(lines.queue)
                time.sleep(0.5)
        status, kind, html = page
        assert status == 200 and kind == "text/html"
        assert "<title>MLflow</title>" in html
        assert (project_clone / ".genflow" / "mlflow.db").is_file()
    finally:
        members = group_members(proc.pid)
        left = stop_group(proc.pid, proc)
    assert len(members) >= 2, members  # genflow and the mlflow server it started, stopped together
    assert left == []


def test_schedule_without_a_prefect_server_is_one_line(project_root, monkeypatch, capsys, saved_environ):
    monkeypatch.chdir(project_root)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["schedule"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("genflow schedule: ") and "needs a Prefect server" in err and "PREFECT_API_URL=" in err


def test_schedule_with_an_absent_prefect_server_is_one_line(project_root, monkeypatch, capsys, saved_environ):
    monkeypatch.chdir(project_root)
    url = f"http://127.0.0.1:{free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    assert main(["schedule"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"genflow schedule: PREFECT_API_URL={url} does not answer")


@pytest.mark.parametrize("cron", ["61 * * * *", "every night", "0 3 * *"])
def test_schedule_with_an_invalid_cron_is_one_line(cron, project_root, monkeypatch, capsys, saved_environ):
    monkeypatch.chdir(project_root)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # the cron is checked first
    assert main(["schedule", "--cron", cron]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"genflow schedule: schedule.cron: {cron!r} is not a valid cron expression")
    assert err.endswith("e.g. '0 3 * * *' for 03:00 every day")


def test_schedule_reads_an_invalid_cron_from_params(project_root, monkeypatch, capsys, saved_environ):
    monkeypatch.chdir(project_root)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["schedule", "--set", "schedule.cron=0 25 * * *"]) == 1
    assert "schedule.cron: '0 25 * * *' is not a valid cron expression" in capsys.readouterr().err
