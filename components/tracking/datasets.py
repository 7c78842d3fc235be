"""MLflow dataset lineage: each model run logs its data as inputs (the Datasets column of the UI).

    log_data_inputs(dataset, data_hash, root, remote)   on the active run:
        <dataset>/train   context "training"     digest = the DVC hash of data/prepared/<dataset>
        <dataset>/test    context "evaluation"   same digest; source = DVC path, remote and its URL

The datasets are metadata only (``mlflow.data.meta_dataset.MetaDataset`` with a ``DvcSource``):
nothing is read or uploaded; `dvc pull` of the path, or `genflow reproduce`, brings the bytes back.
Imported by `runs.model_run` inside the function: importing the tracking package stays cheap.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset

from components.layout import Layout
from components.tracking.uri import redact

MAX_DIGEST_CHARS = 36        # MLflow's limit (mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE); a DVC dir hash fits
CONTEXTS = (("train", "training"), ("test", "evaluation"))


class DvcSource(DatasetSource):
    """Where a dataset lives in DVC: its path in the repository, the remote's name and URL, the split."""

    def __init__(self, path: str, remote: str = "", url: str = "", split: str = "", raw_hash: str = ""):
        self.path, self.remote, self.url, self.split, self.raw_hash = path, remote, url, split, raw_hash

    @staticmethod
    def _get_source_type() -> str:
        return "dvc"

    def load(self) -> str:
        """The path the data lives at (relative to the project root); `dvc pull` it for the bytes."""
        return self.path

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False  # never picked for a plain string source: built explicitly only

    @classmethod
    def _resolve(cls, raw_source: Any) -> "DvcSource":
        raise NotImplementedError("DvcSource is built from its fields, not resolved from a string")

    def to_dict(self) -> dict[str, Any]:
        out = {"path": self.path, "remote": self.remote, "url": self.url, "split": self.split}
        if self.raw_hash:
            out["raw_hash"] = self.raw_hash
        return out

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> "DvcSource":
        return cls(**{k: str(v) for k, v in source_dict.items()
                      if k in ("path", "remote", "url", "split", "raw_hash")})


def _read_dvc_config(path: Path) -> dict[str, dict[str, str]]:
    """{section: {key: value}} of a DVC config file (INI with indented keys, ['remote "name"'] headers)."""
    conf: dict[str, dict[str, str]] = {}
    section = None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return conf
    for line in (raw.strip() for raw in lines):
        if line.startswith("[") and line.endswith("]"):
            section = conf.setdefault(line[1:-1].strip("'"), {})
        elif "=" in line and section is not None and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            section[key.strip()] = value.strip()
    return conf


def dvc_remote(root: Path, remote: str = "") -> tuple[str, str]:
    """(name, URL) of the DVC remote the data are pushed to: storage.dvc_remote (a remote's name, a
    folder or a URL) or the default remote of .dvc/config (config.local overriding); URLs redacted.
    ("", "") outside a DVC repository with no remote set."""
    dvc = Path(root) / ".dvc"
    conf = _read_dvc_config(dvc / "config")
    for section, values in _read_dvc_config(dvc / "config.local").items():
        conf.setdefault(section, {}).update(values)
    remotes = {s[len('remote "'):-1]: v.get("url", "") for s, v in conf.items() if s.startswith('remote "')}
    name = remote or conf.get("core", {}).get("remote", "")
    if name in remotes:
        url = remotes[name]
        if url and "://" not in url and not Path(url).is_absolute():
            url = str((dvc / url).resolve())  # DVC reads a relative URL from the .dvc folder
        return name, redact(url)
    if name:  # storage.dvc_remote given as a folder or a URL
        return "storage.dvc_remote", redact(name if "://" in name else (Path(root) / name).resolve())
    return "", ""


def data_inputs(dataset: str, data_hash: str, root: Path, remote: str = "",
                raw_hash: str = "") -> list[tuple[MetaDataset, str]]:
    """The (dataset, context) pairs of a model run: its train split (training), its test split (evaluation)."""
    name, url = dvc_remote(root, remote)
    path = Layout(".").prepared_dir(dataset).as_posix()  # as dvc.yaml and dvc.lock name it
    digest = str(data_hash)[:MAX_DIGEST_CHARS]
    return [(MetaDataset(DvcSource(path, name, url, split, raw_hash), name=f"{dataset}/{split}", digest=digest),
             context) for split, context in CONTEXTS]


def log_data_inputs(dataset: str, data_hash: Optional[str], root: Path, remote: str = "",
                    raw_hash: str = "") -> None:
    """Log the data of the active run as MLflow inputs (nothing when the data hash is unknown)."""
    import mlflow

    if not data_hash or data_hash == "unknown":
        return
    pairs = data_inputs(dataset, data_hash, root, remote, raw_hash)
    mlflow.log_inputs(datasets=[d for d, _ in pairs], contexts=[c for _, c in pairs], tags_list=[None] * len(pairs))
