"""Secrets stay secret: a password given to genflow shows nowhere people or servers keep text.

These checks need no server: URL redaction, the params logged to MLflow, credentials moved out
of the tracking URI before MLflow sees it, error messages, and unsafe checkpoint loading. The
whole-run check (`genflow run` with passwords in MLFLOW_TRACKING_URI, MLFLOW_TRACKING_PASSWORD
and params.yaml's tracking.tracking_uri, then every stored byte searched) runs against the real
servers in tests/integration/test_stack.py, so that one tiny run serves both.
"""
import ast
import os
import secrets
from pathlib import Path

import pytest

from components import tracking
from components.config import DatasetConfig, ModelConfig, Params
from integration.conftest import free_port

URI_SECRET = "uri-pw-" + secrets.token_hex(6)
KEY = "digits-gpt"



# ---------------------------------------------------------------------------
# No server needed
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, shown", [
    ("http://me:pw@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
    ("https://token@mlflow.example.com/api", "https://***@mlflow.example.com/api"),
    ("http://me:p@ss@host:1/x@y", "http://***@host:1/x@y"),          # a raw '@' in the password
    ("s3://key:secret@bucket/path and http://a:b@c", "s3://***@bucket/path and http://***@c"),
    ("http://127.0.0.1:5000/#/experiments", "http://127.0.0.1:5000/#/experiments"),  # nothing to hide
    ("sqlite:////tmp/a@b/mlflow.db", "sqlite:////tmp/a@b/mlflow.db"),   # a path, not a user
    ("user@example.com", "user@example.com"),
])
def test_redact_hides_the_userinfo_of_urls_only(text, shown):
    assert tracking.redact(text) == shown


def test_params_logged_to_mlflow_never_hold_url_credentials():
    params = Params(datasets={"digits": DatasetConfig(source="builtin:digits")},
                    models={KEY: ModelConfig(family="transformer", backbone="gpt", dataset="digits")})
    params.tracking.tracking_uri = f"http://genflow:{URI_SECRET}@mlflow.internal:5000"
    params.storage.dvc_remote = f"https://dvc:{URI_SECRET}@storage.internal/remote"
    logged = tracking.pipeline_params(params, [KEY])
    assert logged["tracking.tracking_uri"] == "http://***@mlflow.internal:5000"
    assert logged["storage.dvc_remote"] == "https://***@storage.internal/remote"
    assert not [k for k, v in {**logged, **tracking.model_params(params, KEY)}.items() if URI_SECRET in v]


def test_credentials_in_the_uri_move_to_mlflow_variables_and_errors_hide_them(tmp_path, monkeypatch, saved_environ):
    port = free_port()  # nothing listens: the probe fails, its message must not show the password
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://genflow:{URI_SECRET}@127.0.0.1:{port}")
    monkeypatch.setenv("GENFLOW_TRACKING_RETRIES", "1")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(name, None)
    with pytest.raises(tracking.TrackingUnavailable) as e:
        tracking.check_tracking(tmp_path)
    assert str(e.value) == (f"cannot reach MLflow at http://127.0.0.1:{port} after 1 try; "
                            "start the server or set MLFLOW_TRACKING_URI")
    # MLflow prints its URI ("View run at ..."): it now has none, the credentials ride in its variables
    assert os.environ["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{port}"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "genflow"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == URI_SECRET
    import mlflow
    assert URI_SECRET not in mlflow.get_tracking_uri()


def test_uri_credentials_from_params_name_the_params_setting(tmp_path, monkeypatch, saved_environ):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "from-env")  # set variables win over the URI's
    monkeypatch.setenv("GENFLOW_TRACKING_RETRIES", "1")
    params = Params()
    params.tracking.tracking_uri = f"http://genflow:{URI_SECRET}@127.0.0.1:{free_port()}"
    with pytest.raises(tracking.TrackingUnavailable, match=r"set tracking.tracking_uri in params.yaml$") as e:
        tracking.check_tracking(tmp_path, params)
    assert URI_SECRET not in str(e.value) and "http://127.0.0.1:" in str(e.value)
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "from-env"
    assert "MLFLOW_TRACKING_URI" not in os.environ  # a params URI does not become an environment setting


# Calls that turn a file into Python objects by running pickled code, and the argument that stops it.
UNSAFE_LOADS = {("torch", "load"): ("weights_only", True), ("np", "load"): ("allow_pickle", False),
                ("numpy", "load"): ("allow_pickle", False)}


def unsafe_load_calls(root: Path) -> list[str]:
    """`torch.load(` without weights_only=True, np.load with allow_pickle=True, any pickle.load(s)."""
    found = []
    for folder in ("components", "flows", "bench", "tests"):
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name)):
                    continue
                call = (node.func.value.id, node.func.attr)
                where = f"{path.relative_to(root)}:{node.lineno}: {call[0]}.{call[1]}("
                if call[0] == "pickle" and call[1] in ("load", "loads"):
                    found.append(where)
                elif call in UNSAFE_LOADS:
                    name, safe = UNSAFE_LOADS[call]
                    kw = {k.arg: k.value for k in node.keywords}
                    given = kw.get(name)
                    if call[0] == "torch" and not (isinstance(given, ast.Constant) and given.value is True):
                        found.append(where + f" without {name}=True")
                    elif call[0] != "torch" and given is not None and not (
                            isinstance(given, ast.Constant) and given.value is safe):
                        found.append(where + f" with {name} not {safe}")
    return found


def test_every_torch_load_passes_weights_only_true(project_root):
    assert unsafe_load_calls(project_root) == []


def test_the_load_check_catches_an_unsafe_call(tmp_path):
    (tmp_path / "components").mkdir()
    (tmp_path / "components" / "bad.py").write_text(
        "import torch, numpy as np, pickle\n"
        "a = torch.load('m.pt')\n"
        "b = torch.load('m.pt', weights_only=False)\n"
        "c = torch.load('m.pt', map_location='cpu', weights_only=True)\n"
        "d = np.load('x.npy', allow_pickle=True)\n"
        "e = pickle.loads(b'')\n")
    found = unsafe_load_calls(tmp_path)
    assert [f.split(":")[1] for f in found] == ["2", "3", "5", "6"]


def test_overrides_handed_to_prefect_lose_their_url_credentials():
    from components.tracking import strip_userinfo

    assert strip_userinfo("tracking.tracking_uri=http://me:s3cret@10.0.0.5:5000") == \
        "tracking.tracking_uri=http://10.0.0.5:5000"
    assert strip_userinfo("models.digits-unet.train.lr=2e-3") == "models.digits-unet.train.lr=2e-3"
