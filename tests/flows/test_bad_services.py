"""Services that say no: wrong credentials, an MLflow server that is away, a DVC remote that
refuses writes. Each gives one line naming the service and the setting to fix, is retried only
where a retry can help, and leaves no partial state behind.

Wrong credentials are answered by a tiny local HTTP server that replies 401/403 the way an
MLflow server behind authentication does (MLflow's own `--app-name basic-auth` needs the
Flask-WTF extra, which this environment does not install).
"""
import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from components import tracking
from components.config import load_params
from flows.cli import main
from integration.conftest import free_port

KEY = "digits-gpt"


pytestmark = pytest.mark.usefixtures("saved_environ")   # every test here runs commands that set env


class FakeTrackingServer:
    """Answers every request with the next status of `statuses` (the last one repeats) and
    records (method, path, Authorization header) of each."""

    def __init__(self, statuses: list[int]):
        self.statuses, self.requests = list(statuses), []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                owner.requests.append((self.command, self.path, self.headers.get("Authorization")))
                status = owner.statuses.pop(0) if len(owner.statuses) > 1 else owner.statuses[0]
                body = b'{"experiments": []}' if status == 200 else b"You are not authenticated."
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if status == 200 else "text/plain")
                self.send_header("Content-Length", str(len(body)))
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def made(work: Path) -> list[str]:
    """What a command left in `work`, but for the project lock's file (.genflow/run.lock stays)."""
    return sorted(str(p.relative_to(work)) for p in work.rglob("*")
                  if p.is_file() and p.relative_to(work) != Path(".genflow", "run.lock"))


def genflow_run(project_root: Path, work: Path, monkeypatch, capsys, *extra: str) -> tuple[int, str]:
    """`genflow run --only digits-gpt` in an empty folder; returns (exit code, stderr)."""
    monkeypatch.chdir(work)
    code = main(["run", "--params", str(project_root / "params.yaml"), "--only", KEY, *extra])
    return code, capsys.readouterr().err.strip()


# ---------------------------------------------------------------------------
# MLflow: wrong credentials, a server that is away
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("status, what", [(401, "refused the credentials (HTTP 401)"),
                                          (403, "denied this user access (HTTP 403)")])
def test_wrong_credentials_stop_the_run_at_once_with_one_line(status, what, project_root, tmp_path,
                                                             monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    with FakeTrackingServer([status]) as server:
        host = server.url.split("//")[1]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:wrong-pw@{host}")
        monkeypatch.setenv("GENFLOW_TRACKING_RETRIES", "4")
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        code, err = genflow_run(project_root, work, monkeypatch, capsys)
    assert code == 1
    assert err == (f"genflow run: MLflow at {server.url} {what}; check MLFLOW_TRACKING_USERNAME and "
                   "MLFLOW_TRACKING_PASSWORD (or the user:password@ part of MLFLOW_TRACKING_URI)")
    # one try (a retry cannot fix a password), with the URI's credentials, and only a read
    assert len(server.requests) == 1
    method, path, auth = server.requests[0]
    assert "/api/2.0/mlflow/experiments/search" in path
    assert auth == "Basic " + base64.b64encode(b"alice:wrong-pw").decode()
    assert made(work) == []  # refused before any work: no data, no models, no reports


def test_unreachable_server_is_retried_then_one_line(project_root, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("GENFLOW_TRACKING_RETRIES", "2")
    code, err = genflow_run(project_root, work, monkeypatch, capsys)
    assert code == 1
    assert err == (f"genflow run: cannot reach MLflow at {uri} after 2 tries; "
                   "start the server or set MLFLOW_TRACKING_URI")
    assert made(work) == []


def test_unreachable_server_from_params_names_tracking_uri(project_root, tmp_path, monkeypatch):
    from flows.retrain import run_pipeline

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("GENFLOW_TRACKING_RETRIES", "1")
    params = load_params(project_root / "params.yaml", [f"tracking.tracking_uri=http://127.0.0.1:{free_port()}"])
    with pytest.raises(tracking.TrackingUnavailable, match=r"after 1 try; start the server or set "
                                                           r"tracking.tracking_uri in params.yaml$"):
        run_pipeline(params, work, only=[KEY])
    assert made(work) == []


def test_the_command_line_names_params_yaml_when_the_uri_came_from_it(project_root, tmp_path, monkeypatch,
                                                                      capsys, saved_environ):
    """The CLI hands params' URI to MLflow through MLFLOW_TRACKING_URI; the message still names params.yaml."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv(tracking.URI_FROM_PARAMS_ENV, raising=False)
    monkeypatch.setenv("GENFLOW_TRACKING_RETRIES", "1")
    uri = f"http://127.0.0.1:{free_port()}"
    code, err = genflow_run(project_root, work, monkeypatch, capsys, "--set", f"tracking.tracking_uri={uri}")
    assert code == 1
    assert err == (f"genflow run: cannot reach MLflow at {uri} after 1 try; start the server or set "
                   "tracking.tracking_uri in params.yaml")
    assert made(work) == []


def test_a_server_that_comes_back_is_reached_by_the_retry(tmp_path, monkeypatch):
    with FakeTrackingServer([503, 503, 200]) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.setenv("GENFLOW_TRACKING_RETRIES", "4")
        assert tracking.check_tracking(tmp_path) == server.url
    assert len(server.requests) == 3  # two refusals, then the answer; MLflow's own retries stay off


# ---------------------------------------------------------------------------
# DVC: a remote that refuses writes
# ---------------------------------------------------------------------------

@pytest.fixture
def dvc_project(project_clone, monkeypatch):
    """A project clone with the digits snapshot ingested and committed to DVC's cache."""
    from components.versioning import commit_stages
    from flows.stages import run_stage

    monkeypatch.chdir(project_clone)  # DVC resolves a stage name against dvc.yaml of the working directory
    params = load_params(project_clone / "params.yaml")
    run_stage(params, "ingest", "digits", project_clone)
    commit_stages(project_clone, ["ingest@digits"])
    return project_clone, params


def refusing_remote(tmp_path: Path, how: str) -> Path:
    if how == "under-a-file":  # mkdir fails for every user, root included
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("a regular file where the remote's parent folder should be")
        return blocker / "remote"
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop root from writing (the under-a-file case covers it)")
    folder = tmp_path / "read-only-remote"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@pytest.mark.parametrize("how", ["under-a-file", "read-only-folder"])
def test_push_to_a_remote_that_refuses_writes(dvc_project, tmp_path, how):
    from components.versioning import VersioningError, push

    root, _ = dvc_project
    remote = refusing_remote(tmp_path, how)
    lock_before = (root / "dvc.lock").read_bytes()
    with pytest.raises(VersioningError) as e:
        push(root, str(remote))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"dvc push to {remote} failed: ")
    assert msg.endswith("; fix storage.dvc_remote in params.yaml (a remote name, folder or URL) "
                        "or see `dvc remote list`")
    assert (root / "dvc.lock").read_bytes() == lock_before  # the record of the data is untouched
    assert not remote.exists() or not any(p.is_file() for p in remote.rglob("*"))  # nothing half pushed

    good = tmp_path / "good-remote"
    assert push(root, str(good)) > 0  # the same data reach a remote that accepts them
    assert any(p.is_file() for p in good.rglob("*"))


def test_run_summary_reports_the_refusing_remote_in_one_line(dvc_project, tmp_path, monkeypatch):
    """The end of the flow (finish): the push fails, the run is failed with a note naming the setting."""
    import prefect.artifacts

    from flows.retrain import finish

    root, params = dvc_project
    remote = refusing_remote(tmp_path, "under-a-file")
    params.storage.dvc_remote = str(remote)
    tables = []
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", lambda **kw: tables.append(kw["markdown"]))
    lock_before = (root / "dvc.lock").read_bytes()
    summary = finish(params, root, [], {}, 1.0, {"digits": {"raw": "x"}})
    assert summary["status"] == "failed"
    [note] = summary["notes"]
    assert "\n" not in note and str(remote) in note and "storage.dvc_remote" in note
    assert json.loads((root / "reports" / "last_run.json").read_text()) == summary
    assert (root / "dvc.lock").read_bytes() == lock_before
    assert tables and "failed" in tables[0]


@pytest.mark.parametrize("cut", ["empty", "half"])
def test_a_dvc_lock_cut_by_a_killed_commit_is_put_back_from_the_last_good_copy(dvc_project, cut, capsys):
    """DVC rewrites dvc.lock in place; a SIGKILL in between leaves it empty or cut. The next commit
    puts back the copy genflow kept after the last good commit, then records its stages again."""
    from components.versioning import commit_stages, lock_hashes

    root, _ = dvc_project
    good = (root / "dvc.lock").read_text()
    (root / "dvc.lock").write_text("" if cut == "empty" else good[: len(good) // 2])
    commit_stages(root, ["ingest@digits"])
    assert (root / "dvc.lock").read_text() == good
    assert "cut short by an interrupted dvc commit; put back the last good copy" in capsys.readouterr().out
    assert lock_hashes(root)   # lineage reads it again
