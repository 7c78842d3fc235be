"""`dvc repro` of the data stages in a temporary clone: dvc.lock written, nothing left to do after."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration


def _sh(cmd, cwd, env):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


@pytest.fixture
def clone(tmp_path, project_root):
    """A fresh repository holding the project's tracked and new (not ignored) files."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=project_root,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    dest = tmp_path / "clone"
    for rel in filter(None, files):
        src = project_root / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `genflow` and DVC's python
    _sh(["git", "init", "-q"], dest, env)
    _sh(["git", "add", "-A"], dest, env)
    _sh(["git", "commit", "-qm", "clone"], dest, env)
    return dest, env


def test_dvc_repro_data_stages_then_nothing_to_do(clone):
    root, env = clone
    dvc = [sys.executable, "-m", "dvc"]
    _sh(dvc + ["repro", "prepare@digits"], root, env)

    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    for stage in ("ingest@digits", "validate@digits", "prepare@digits"):
        assert stage in lock, f"{stage} missing from dvc.lock"
    prepared = [o for o in lock["prepare@digits"]["outs"] if o["path"] == "data/prepared/digits"]
    assert prepared and prepared[0]["md5"].endswith(".dir")
    assert (root / "data/prepared/digits/manifest.json").exists()

    status = _sh(dvc + ["status", "prepare@digits", "--with-deps"], root, env)
    assert "up to date" in status
    again = _sh(dvc + ["repro", "prepare@digits"], root, env)
    assert "Running stage" not in again

    _sh(dvc + ["push", "prepare@digits", "--with-deps"], root, env)
    remote = root / ".genflow" / "dvc-remote"
    assert remote.is_dir() and any(p.is_file() for p in remote.rglob("*"))

    # The lineage helper reads the same hashes
    from components.versioning import dataset_hashes
    hashes = dataset_hashes("digits", root)
    assert hashes["prepared"] == prepared[0]["md5"]
