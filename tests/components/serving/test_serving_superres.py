"""`genflow serve` super-resolution: `{"upscale": <PNG or rows>, "n", "steps", "seed"}` on a
super-resolution model passes the smoke check, gives what `genflow sample --upscale` writes, and
answers a low-res image of the wrong size (or a setting it has not) with a one-line 422.

A tiny exported super-resolution U-Net (tests/serving_models.py) registered in the session's
SQLite store, served in-process by FastAPI's TestClient.
"""
from __future__ import annotations

import base64
import io
import os
import shutil
import time
from argparse import Namespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from components.serving.app import ServeSettings, create_app
from serving_models import SAMPLE_ARGS, export_tiny_sr, register, unique

LEVELS = 17


def png(levels: np.ndarray, mode: str = "L") -> str:
    """Grey levels 0..16 (H, W) -> base64 PNG, as a user's 8-bit image of them would be."""
    grey = np.round(np.asarray(levels, dtype=np.float64) * 255 / (LEVELS - 1)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey, mode="L").convert(mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode(png_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))))


LOWRES = np.array([[0, 6, 9, 0], [0, 11, 3, 0], [0, 16, 0, 0], [0, 5, 2, 0]])   # a 4x4 stroke


@pytest.fixture(scope="module")
def served(tmp_path_factory, session_tmp):
    root = tmp_path_factory.mktemp("serve-sr")
    folder = export_tiny_sr(root)
    name = unique("sr")
    register(folder, name, session_tmp / "serving-artifacts")
    app = create_app(ServeSettings(root=root, tracking_uri=os.environ["MLFLOW_TRACKING_URI"], models=(name,),
                                   poll_seconds=0.1, threads=1, max_n=8))
    with TestClient(app) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the super-resolution model was not served within 60 s"
            time.sleep(0.05)
        yield c, name, folder


def test_upscaling_over_http_gives_what_genflow_sample_writes(served, tmp_path):
    from flows.sample import sample_cli

    c, name, _ = served
    listed = next(m for m in c.get("/v1/models").json() if m["name"] == name)
    assert listed["version"] == "1" and listed["last_swap_error"] is None     # passed its smoke check
    body = {"upscale": png(LOWRES), "n": 3, "steps": 6, "seed": 4}
    r = c.post(f"/v1/models/{name}/generate", json=body)
    assert r.status_code == 200, r.text
    ours = [decode(p) for p in r.json()["images"]]
    assert len(ours) == 3 and all(x.shape == (8, 8) for x in ours)
    assert any(not np.array_equal(ours[0], x) for x in ours[1:])             # n draws, not one repeated

    (tmp_path / "low.png").write_bytes(base64.b64decode(png(LOWRES)))
    out = tmp_path / "cli.png"
    sample_cli(Namespace(**{**SAMPLE_ARGS, "model": f"{name}@champion", "count": 3, "out": str(out), "steps": 6,
                            "seed": 4, "upscale": str(tmp_path / "low.png")}), tmp_path)
    for i, x in enumerate(ours):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"cli-{i + 1}.png").convert("L")), x)

    rows = c.post(f"/v1/models/{name}/generate", json={**body, "upscale": LOWRES.tolist()})
    assert rows.status_code == 200 and rows.json()["images"] == r.json()["images"]   # rows read as the PNG is
    other = c.post(f"/v1/models/{name}/generate", json={**body, "upscale": LOWRES[:, ::-1].tolist()})
    assert other.json()["images"] != r.json()["images"]                       # the output follows the input
    default = c.post(f"/v1/models/{name}/generate", json={"upscale": LOWRES.tolist()})
    assert default.status_code == 200 and len(default.json()["images"]) == 1


@pytest.mark.parametrize("body, field, problem", [
    ({"upscale": png(np.zeros((8, 8)))}, "upscale", "8x8 pixels; {name} upscales 4x4 images to 8x8 (1/2 of its size); "
                                                    "give a 4x4 image"),
    ({"upscale": [[0] * 4] * 3}, "upscale", "4x3 values; {name} upscales 4x4 images to 8x8"),
    ({"upscale": [[17] * 4] * 4}, "upscale", "values must be in 0..16"),
    ({"upscale": [["a"] * 4] * 4}, "upscale", "expected 4 rows of 4 integers"),
    ({"upscale": png(np.zeros((4, 4)), "RGB")}, "upscale", "3 channels (RGB), the model takes 1 (grayscale)"),
    ({"upscale": "%%%"}, "upscale", "not valid base64"),
    ({"upscale": base64.b64encode(b"no png").decode()}, "upscale", "not an image PIL can read"),
    ({"upscale": {"rows": 4}}, "upscale", "expected a base64 PNG string or rows of integers"),
    ({"n": 2}, "upscale", None),
    ({"upscale": [[0] * 4] * 4, "steps": 21}, "steps", "21 is outside 1..20"),
    ({"upscale": [[0] * 4] * 4, "n": 9}, "n", None),
    ({"upscale": [[0] * 4] * 4, "label": 1}, "label", None),
    ({"upscale": [[0] * 4] * 4, "guidance": 2.0}, "guidance", None),
])
def test_a_wrong_size_or_setting_is_a_one_line_422_naming_the_field(served, body, field, problem):
    c, name, _ = served
    r = c.post(f"/v1/models/{name}/generate", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["field"] == field, detail
    assert "\n" not in detail["problem"] and "--resize" not in detail["problem"]
    if problem:
        assert problem.format(name=name) in detail["problem"], detail
    assert c.post(f"/v1/models/{name}/generate", json={"upscale": LOWRES.tolist(), "steps": 2}).status_code == 200


def test_the_smoke_check_upscales_and_replays_the_exports_parity_inputs(served, tmp_path, tmp_path_factory):
    from components.inference import SuperResEngine, load_engine
    from components.inference.replay import PARITY_INPUTS_FILE, replay
    from components.serving.models import SmokeCheckFailed, smoke_check

    _, _, folder = served
    engine = load_engine(folder, threads=1)
    assert isinstance(engine, SuperResEngine)
    result = replay(folder, engine.session)
    with np.load(folder / PARITY_INPUTS_FILE) as recorded:
        assert "in:lowres" in recorded.files                  # the gate's call with a low-res image
    assert result is not None and result["max_abs"] <= 1e-6
    smoke_check(engine)

    other = export_tiny_sr(tmp_path_factory.mktemp("sr-other"), seed=1)   # same shapes, other weights
    drifted = tmp_path / "drifted"
    shutil.copytree(folder, drifted)
    shutil.copy(other / "model.onnx", drifted / "model.onnx")
    with pytest.raises(SmokeCheckFailed, match=r"its export's parity inputs give \w+ off by"):
        smoke_check(load_engine(drifted, threads=1))
