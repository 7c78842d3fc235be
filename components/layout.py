"""Where a project keeps its files: one ``Layout(root)`` instead of paths rebuilt by hand.

    lay = Layout(root)
    lay.model_dir("digits-unet")     # root/models/digits-unet
    lay.report_dir("digits-unet")    # root/reports/digits-unet
    lay.export_dir("digits-unet")    # root/exports/digits-unet
    lay.raw_dir("digits")            # root/data/raw/digits
    lay.prepared_dir("digits")       # root/data/prepared/digits
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

EXPORT_CONFIG_FILE = "config.json"   # exports/<key>/config.json: what an onnxruntime engine needs
CHECKPOINT_DIR = "ckpt"       # models/<key>/ckpt/last.pt: the resumable training checkpoint
CHECKPOINT_NAME = "last.pt"


@dataclass(frozen=True)
class Layout:
    root: Path

    def __init__(self, root: Union[str, Path] = "."):
        object.__setattr__(self, "root", Path(root))

    # data (DVC outputs)
    @property
    def data(self) -> Path:
        return self.root / "data"

    def raw_dir(self, dataset: str) -> Path:
        return self.data / "raw" / dataset

    def prepared_dir(self, dataset: str) -> Path:
        return self.data / "prepared" / dataset

    def validation_file(self, dataset: str) -> Path:
        return self.data / "validation" / f"{dataset}.json"

    # models and what is made from them
    def model_dir(self, key: str) -> Path:
        return self.root / "models" / key

    def model_file(self, key: str) -> Path:
        return self.model_dir(key) / "model.pt"

    def checkpoint_file(self, key: str) -> Path:
        return self.model_dir(key) / CHECKPOINT_DIR / CHECKPOINT_NAME

    def report_dir(self, key: str) -> Path:
        return self.root / "reports" / key

    def export_dir(self, key: str) -> Path:
        return self.root / "exports" / key

    @property
    def last_run(self) -> Path:
        return self.root / "reports" / "last_run.json"

    # genflow's own state (MLflow on SQLite, caches, locks)
    @property
    def state(self) -> Path:
        return self.root / ".genflow"

    @property
    def cache(self) -> Path:
        return self.state / "cache"
