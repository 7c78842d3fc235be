"""Test isolation: every test session writes only inside its own temporary folder.

The environment is set before any heavy library is imported (MLflow, Prefect, DVC and
Great Expectations read it at import time).
"""
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="genflow-tests-"))

os.environ.update({
    "PREFECT_HOME": str(_SESSION_TMP / "prefect"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
    "MLFLOW_TRACKING_URI": f"sqlite:///{_SESSION_TMP / 'mlflow.db'}",
    "DO_NOT_TRACK": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "DVC_SITE_CACHE_DIR": str(_SESSION_TMP / "dvc-site"),
    "GIT_AUTHOR_NAME": "genflow-tests", "GIT_AUTHOR_EMAIL": "tests@genflow.invalid",
    "GIT_COMMITTER_NAME": "genflow-tests", "GIT_COMMITTER_EMAIL": "tests@genflow.invalid",
    "OMP_WAIT_POLICY": "PASSIVE",
    "TQDM_DISABLE": "1",
})
os.environ.setdefault("OMP_NUM_THREADS", "2")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT
