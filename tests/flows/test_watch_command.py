"""flows/watch.py and `genflow watch` without a server: durations, the datasets watched, the
progress lines, the state file, and the one-line errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from components.config import load_params
from components.errors import ConfigError
from conftest import make_imagefolder
from flows.cli import main
from flows.watch import parse_every, watch_once, watched_datasets
from integration.conftest import free_port


@pytest.mark.parametrize("text, seconds", [("60s", 60), ("5m", 300), ("1h", 3600), ("90", 90), ("1.5s", 1.5)])
def test_parse_every(text, seconds):
    assert parse_every(text) == seconds


@pytest.mark.parametrize("text", ["0s", "soon", "-5s", ""])
def test_parse_every_refuses_what_is_not_a_duration(text):
    with pytest.raises(ConfigError, match="^--every: .* is not a duration of at least 1 second"):
        parse_every(text)


def user_params(project_root, src):
    return load_params(project_root / "params.yaml",
                       [f"datasets.digits.source=imagefolder:{src}", "models.pydoc-gpt.enabled=false"])


def test_watched_datasets_are_those_of_enabled_models(project_root, tmp_path):
    params = user_params(project_root, tmp_path)
    watched = watched_datasets(params)
    assert "pydoc" not in watched
    assert sorted(watched["digits"]) == sorted(k for k, m in params.models.items()
                                               if m.enabled and m.dataset == "digits")


def test_a_change_without_prefect_api_url_is_one_line_and_stays_to_report(project_root, tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    src = make_imagefolder(tmp_path / "mine", {"a": 2, "b": 2}, size=(8, 8))
    params = user_params(project_root, src)
    lines: list[str] = []
    assert watch_once(params, tmp_path, say=lines.append, warn=lines.append) == []
    kb = sum(p.stat().st_size for p in src.rglob("*.png")) / 1e3
    assert lines == [f"watch: digits first seen (4 files, {kb:.0f} kB), recorded"]
    recorded = json.loads((tmp_path / ".genflow" / "watch.json").read_text())["digits"]

    lines.clear()
    assert watch_once(params, tmp_path, say=lines.append, warn=lines.append) == []
    assert lines == ["watch: digits unchanged"]

    make_imagefolder(src, {"a": 3}, size=(8, 8), seed=2)
    lines.clear()
    errors = watch_once(params, tmp_path, say=lines.append, warn=lines.append)
    assert lines == errors and len(errors) == 1
    assert errors[0].startswith("watch: digits: changed (1 file added), but PREFECT_API_URL is not set")
    assert "\n" not in errors[0]
    # not recorded: the next look (with a server) reports the change again
    assert json.loads((tmp_path / ".genflow" / "watch.json").read_text())["digits"] == recorded

    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")   # nothing listens there
    lines.clear()
    (error,) = watch_once(params, tmp_path, say=lines.append, warn=lines.append)
    assert error.startswith("watch: digits: changed (1 file added), but PREFECT_API_URL=http://127.0.0.1:")
    assert "does not answer" in error and error.endswith("the change is reported again next time")
    assert json.loads((tmp_path / ".genflow" / "watch.json").read_text())["digits"] == recorded


def test_cli_refuses_a_bad_every_in_one_line(project_root, monkeypatch, capsys):
    monkeypatch.chdir(project_root)
    assert main(["watch", "--every", "soon"]) == 1
    assert capsys.readouterr().err.strip() == ("genflow watch: --every: 'soon' is not a duration of at least "
                                              "1 second; e.g. 60s, 5m or 1h")


def test_every_looks_again_until_ctrl_c(project_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(project_root), "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "watch", "--every", "1s",
                             "--params", str(project_root / "params.yaml")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while sum(line == "watch: digits unchanged" for line in lines) < 2 and time.monotonic() < deadline:
            lines.append(proc.stdout.readline().strip())
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert lines[0] == "watch: digits first seen (builtin:digits), recorded"
    assert lines.count("watch: digits unchanged") == 2, lines
    assert proc.returncode == 130 and err.strip().endswith("genflow: interrupted")
    assert set(json.loads((tmp_path / ".genflow" / "watch.json").read_text())) >= {"digits", "pydoc"}
