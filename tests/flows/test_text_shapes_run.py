"""`genflow run --quick --only pydoc-gpt` on a user's text file of the hardest shape: one sentence per
line, a UTF-8 BOM and Windows line endings. It trains (split by characters), and its MLflow run
lists the data as dataset inputs whose digest is the DVC hash in dvc.lock."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import TINY_OVERRIDES, TINY_WORDS

pytestmark = pytest.mark.integration


def test_quick_run_on_one_sentence_per_line_crlf_bom_file(project_clone, tmp_path):
    import numpy as np

    rng = np.random.default_rng(1)
    lines = [" ".join(rng.choice(TINY_WORDS, size=10)).capitalize() + "." for _ in range(300)]
    src = tmp_path / "sentences.txt"
    src.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    sets = [s for s in TINY_OVERRIDES if s.startswith("models.pydoc-gpt.")]
    sets += [f"datasets.pydoc.source=textfile:{src}", "datasets.pydoc.text_validation.min_chars=1000"]
    cmd = [sys.executable, "-m", "flows.cli", "run", "--quick", "--only", "pydoc-gpt"]
    for s in sets:
        cmd += ["--set", s]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "MLFLOW_TRACKING_URI": uri}
    res = subprocess.run(cmd, cwd=project_clone, env=env, capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "split by characters" in out

    report = json.loads((project_clone / "reports/last_run.json").read_text())
    assert report["models"]["pydoc-gpt"]["status"] == "trained", report
    manifest = json.loads((project_clone / "data/prepared/pydoc/manifest.json").read_text())
    assert manifest["split_by"] == "characters"
    assert manifest["normalised"] == {"bom_stripped": 1, "crlf_files": 1, "crlf_line_ends": 300}

    lock = yaml.safe_load((project_clone / "dvc.lock").read_text())
    prepared = next(o["md5"] for st in lock["stages"].values() for o in st.get("outs") or []
                    if o["path"] == "data/prepared/pydoc")
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             "attributes.run_name = 'pydoc-gpt'")[0]
    inputs = {d.dataset.name: d.dataset for d in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"pydoc/train", "pydoc/test"}
    assert {d.digest for d in inputs.values()} == {prepared}
    assert {json.loads(d.source)["path"] for d in inputs.values()} == {"data/prepared/pydoc"}
