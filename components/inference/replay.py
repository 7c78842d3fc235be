"""The export's parity inputs, kept beside the graph and replayed where the graph is loaded.

At export the parity gate's first call on model.onnx is recorded: its inputs and onnxruntime's
outputs (which matched PyTorch within export.parity_atol) go to ``parity_inputs.npz``. Whoever
loads the folder later (a `genflow serve` smoke check, on whatever provider it got) runs the same
inputs again and compares:

    session = RecordingSession(session)          # export: wraps the session the gate uses
    ...gate runs...
    save_record(folder / PARITY_INPUTS_FILE, session.record)
    result = replay(folder, engine.session)      # later: {"max_abs", "atol", "output"} or None

Torch-free: numpy and an onnxruntime session only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

PARITY_INPUTS_FILE = "parity_inputs.npz"


class RecordingSession:
    """An onnxruntime session that keeps its first run's inputs and outputs."""

    def __init__(self, session: Any):
        self.session = session
        self.record: Optional[dict] = None

    def run(self, output_names: list[str], feeds: dict) -> list:
        outputs = self.session.run(output_names, feeds)
        if self.record is None:
            self.record = {"inputs": {k: np.array(v) for k, v in feeds.items()},
                           "outputs": {k: np.array(v) for k, v in zip(output_names, outputs)}}
        return outputs


def save_record(path: Path, record: Optional[dict], atol: float) -> None:
    """inputs as ``in:<name>``, outputs as ``out:<name>``, the gate's tolerance as ``atol``."""
    if record is None:
        return
    arrays = {f"in:{k}": v for k, v in record["inputs"].items()}
    arrays.update({f"out:{k}": v for k, v in record["outputs"].items()})
    with open(path, "wb") as f:
        np.savez(f, atol=np.float64(atol), **arrays)


def replay(folder: Path, session: Any) -> Optional[dict]:
    """Run the recorded inputs on `session`; None when the folder has no record (older exports)."""
    path = Path(folder) / PARITY_INPUTS_FILE
    if not path.is_file():
        return None
    with np.load(path) as data:
        feeds = {k[3:]: data[k] for k in data.files if k.startswith("in:")}
        expected = {k[4:]: data[k] for k in data.files if k.startswith("out:")}
        atol = float(data["atol"])
    names = sorted(expected)
    got = session.run(names, feeds)
    worst, where = 0.0, names[0] if names else ""
    for name, value in zip(names, got):
        diff = float(np.max(np.abs(np.asarray(value, np.float64) - expected[name]))) if expected[name].size else 0.0
        if np.isnan(diff) or diff > worst:
            worst, where = diff, name
            if np.isnan(diff):
                break
    return {"max_abs": worst, "atol": atol, "output": where}
