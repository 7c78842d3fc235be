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
_SESSION_URI = os.environ["MLFLOW_TRACKING_URI"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_mlflow_uri():
    """Some tests point MLflow's global tracking URI at a server or another store: put the session's back."""
    session_uri = os.environ.get("MLFLOW_TRACKING_URI", _SESSION_URI)
    yield
    if "components.tracking" in sys.modules:  # the CLI sets it when params.yaml gave the tracking URI
        os.environ.pop(sys.modules["components.tracking"].URI_FROM_PARAMS_ENV, None)
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(session_uri)


@pytest.fixture
def saved_environ():
    """Commands set defaults in os.environ and may point MLflow elsewhere: put both back afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(saved["MLFLOW_TRACKING_URI"])


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session")
def digits_root(session_tmp):
    """The digits, ingested and prepared once per test session (family and image-metric tests share it)."""
    from components import data
    from components.config import DatasetConfig

    root = session_tmp / "digits-root"
    if not (root / "data" / "prepared" / "digits" / "manifest.json").exists():
        cfg = DatasetConfig(source="builtin:digits", kind="image", image_size=8, levels=17)
        data.ingest("digits", cfg, root)
        data.prepare("digits", cfg, root)
    return root


def logged_steps(run_id: str, metric: str) -> list[int]:
    """The steps at which `metric` was logged to run `run_id` of the session's MLflow store, in order."""
    import mlflow

    return sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, metric))


def make_imagefolder(folder: Path, counts: dict[str, int], size=(16, 16), seed=0) -> Path:
    """One sub-folder per class with distinct random grey PNGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            px = rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
            Image.fromarray(px, mode="L").save(folder / cls / f"img_{i}.png")
    return folder


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


def make_clone(project_root: Path, dest: Path) -> Path:
    """A fresh git repository holding the project's tracked and new (not ignored) files."""
    import shutil
    import subprocess

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=project_root,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = project_root / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


@pytest.fixture
def project_clone(tmp_path, project_root) -> Path:
    return make_clone(project_root, tmp_path / "clone")


# Tiny settings that run the whole chain in seconds (the real run keeps params.yaml's).
TINY_OVERRIDES = [
    "models.digits-unet.unet.channels=[8, 16]", "models.digits-unet.unet.time_dim=16",
    "models.digits-unet.unet.groups=4",
    "models.digits-unet.diffusion.timesteps=20", "models.digits-unet.sample.steps=5",
    "models.digits-unet.train.max_steps=6", "models.digits-unet.train.batch_size=16",
    "models.digits-unet.eval.num_samples=30", "models.digits-unet.eval.sampler_sweep=[ddim5]",
    "models.digits-unet.eval.inpaint_samples=10",
    "models.digits-gpt.gpt.n_layer=1", "models.digits-gpt.gpt.n_head=2", "models.digits-gpt.gpt.n_embd=16",
    "models.digits-gpt.train.max_steps=6", "models.digits-gpt.train.batch_size=16",
    "models.digits-gpt.eval.num_samples=30", "models.digits-gpt.eval.inpaint_samples=10",
    "models.pydoc-gpt.gpt.n_layer=1", "models.pydoc-gpt.gpt.n_head=2", "models.pydoc-gpt.gpt.n_embd=16",
    "models.pydoc-gpt.gpt.block_size=32", "models.pydoc-gpt.train.max_steps=6",
    "models.pydoc-gpt.train.batch_size=8", "models.pydoc-gpt.sample.length=16",
    "models.pydoc-gpt.eval.ngram_orders=[1, 2, 3]", "models.pydoc-gpt.eval.text_samples=1",
]


TINY_WORDS = ("return the value of the list and raise an error if the key is missing from the "
              "mapping object this function builds a new string").split()


@pytest.fixture(scope="session")
def tiny_corpus(session_tmp) -> Path:
    """A small English-like text file (120 paragraphs of docstring words) shared by the text families' tests."""
    import numpy as np

    path = session_tmp / "tiny-corpus.txt"
    if not path.exists():
        rng = np.random.default_rng(0)
        paragraphs = [" ".join(rng.choice(TINY_WORDS, size=12)).capitalize() + "." for _ in range(120)]
        path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path

