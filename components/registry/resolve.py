"""Where a model comes from: a registered version in the MLflow registry, downloaded to a folder.

    name, alias, version = parse_model_spec("digits-unet@champion")
    folder = download_version(name, alias, version, root, tmp)    # model.onnx + config.json
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Optional

from components.errors import ConfigError, RegistryError
from components.layout import EXPORT_CONFIG_FILE as CONFIG_FILE
from components.registry.lease import is_lease

DEFAULT_ALIAS = "champion"

_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9][\w.\-]*?)(?:@(?P<alias>[\w.\-]+)|:(?P<version>\d+))?$")


def parse_model_spec(spec: str) -> tuple[str, Optional[str], Optional[str]]:
    """'digits-unet' -> (name, 'champion', None); 'x@challenger' -> alias; 'x:3' -> version."""
    m = _SPEC.match(spec.strip())
    if not m:
        raise ConfigError(f"model {spec!r}: expected MODEL, MODEL@alias or MODEL:version, "
                          "e.g. digits-unet@champion or pydoc-gpt:3")
    alias, version = m["alias"], m["version"]
    return m["name"], (alias or (None if version else DEFAULT_ALIAS)), version


def tracking_uri_for(root: Path) -> str:
    """The MLflow tracking URI of the project at `root` (MLFLOW_TRACKING_URI, else its SQLite store)."""
    from components.tracking import tracking_uri

    return tracking_uri(Path(root))


def registry_version(name: str, alias: Optional[str], version: Optional[str], uri: str) -> Any:
    """The ModelVersion for name@alias or name:version, or one line saying what exists."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise RegistryError(f"no MLflow registry at {uri}: run `genflow run` first, set MLFLOW_TRACKING_URI, "
                            "or sample from a folder with --exports DIR")
    client = MlflowClient(uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        try:
            known = sorted(m.name for m in client.search_registered_models() if not is_lease(m.name))
        except MlflowException:
            known = []
        raise RegistryError(f"model {name!r}: not in the MLflow registry at {uri}; registered: "
                            f"{', '.join(known) or 'none'}") from None
    aliases = dict(getattr(model, "aliases", {}) or {})
    try:
        if version is not None:
            return client.get_model_version(name, version)
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        if version is not None:
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
            raise RegistryError(f"{name}:{version}: no such version in the MLflow registry; "
                                f"{name} has versions: {', '.join(map(str, versions)) or 'none'}") from None
        known = ", ".join(f"{a} (version {v})" for a, v in sorted(aliases.items())) or "none"
        raise RegistryError(f"{name}@{alias}: no such alias; {name} has aliases: {known}") from None


def download_version(name: str, alias: Optional[str], version: Optional[str], root: Path, dst: Path) -> Path:
    """Download a registered version's exported folder into `dst`; returns the folder.

    The run's artifact folder ``onnx/`` (the whole exports/<key>/ folder) is used when present;
    otherwise the registered ONNX model plus the run's ``extras/`` (config.json).
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    uri = tracking_uri_for(root)
    mv = registry_version(name, alias, version, uri)
    where = f"{name}:{mv.version}"
    folder = Path(dst) / "onnx"
    try:
        mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="onnx", dst_path=str(dst),
                                            tracking_uri=uri)
    except (MlflowException, OSError):
        folder.mkdir(parents=True, exist_ok=True)
    if (folder / CONFIG_FILE).is_file() and (folder / "model.onnx").is_file():
        return folder
    try:  # the registry's layout: model.onnx inside the logged MLflow model, config.json under extras/
        model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(Path(dst) / "model"),
                                                             tracking_uri=uri))
        extras = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="extras",
                                                          dst_path=str(Path(dst) / "run"), tracking_uri=uri))
    except (MlflowException, OSError) as e:
        raise RegistryError(f"{where}: could not download its ONNX files from run {mv.run_id} "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    onnx_files = sorted(model_dir.rglob("*.onnx"))
    if not onnx_files or not (extras / CONFIG_FILE).is_file():
        raise RegistryError(f"{where}: run {mv.run_id} holds no exported model (model.onnx + config.json); "
                            "register it again with `genflow run`")
    shutil.copy2(onnx_files[0], folder / "model.onnx")
    for p in extras.iterdir():
        if p.is_file() and not (folder / p.name).exists():
            shutil.copy2(p, folder / p.name)
    return folder
