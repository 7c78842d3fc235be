"""`genflow serve` inpainting: `{"inpaint": {"image", "mask", ...}}` on a diffusion model gives what
`genflow sample --inpaint` writes; bad images and masks are 422 naming the field, in one line.

Tiny exported models registered in the session's SQLite store (tests/serving_models.py), served
in-process by FastAPI's TestClient.
"""
from __future__ import annotations

import base64
import io
import os
import time
from argparse import Namespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from components.serving.app import ServeSettings, create_app
from serving_models import export_tiny, register, unique

LEVELS = 17


def png(levels: np.ndarray, mode: str = "L") -> str:
    """Grey levels 0..16 (H, W) -> base64 PNG, as a user's 8-bit image of them would be."""
    grey = np.round(np.asarray(levels, dtype=np.float64) * 255 / (LEVELS - 1)).astype(np.uint8)
    im = Image.fromarray(grey, mode="L").convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode(png_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))))


def digit_and_mask():
    rng = np.random.default_rng(0)
    image = rng.integers(0, LEVELS, (8, 8))
    regenerate = np.zeros((8, 8), dtype=np.int64)
    regenerate[4:] = 1                                   # the bottom half
    return image, regenerate


@pytest.fixture(scope="module")
def client(tmp_path_factory, session_tmp):
    root = tmp_path_factory.mktemp("serve-inpaint")
    folders = export_tiny(root)
    names = {k: unique(k) for k in ("unet", "pixels")}
    for kind, name in names.items():
        register(folders[kind], name, session_tmp / "serving-artifacts")
    app = create_app(ServeSettings(root=root, tracking_uri=os.environ["MLFLOW_TRACKING_URI"],
                                   models=tuple(names.values()), poll_seconds=0.1, threads=1, max_n=8))
    with TestClient(app) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "models not loaded within 60 s"
            time.sleep(0.05)
        yield c, names, root


def test_inpainting_gives_what_genflow_sample_writes_and_keeps_the_known_pixels(client, tmp_path):
    from flows.sample import sample_cli

    c, names, _ = client
    image, regenerate = digit_and_mask()
    body = {"n": 3, "label": 1, "steps": 6, "seed": 4,
            "inpaint": {"image": png(image), "mask": png(regenerate * 16), "jump": 2, "resample": 2}}
    r = c.post(f"/v1/models/{names['unet']}/generate", json=body)
    assert r.status_code == 200, r.text
    ours = [decode(p) for p in r.json()["images"]]
    assert len(ours) == 3 and ours[0].shape == (8, 8)
    want_top = np.round(image[:4] * 255 / 16).astype(np.uint8)
    for x in ours:
        np.testing.assert_array_equal(x[:4], want_top)    # RePaint: the kept rows come back as sent
    assert any(not np.array_equal(ours[0][4:], x[4:]) for x in ours[1:])  # completions differ

    (tmp_path / "img.png").write_bytes(base64.b64decode(png(image)))
    (tmp_path / "mask.png").write_bytes(base64.b64decode(png(regenerate * 16)))
    out = tmp_path / "cli.png"
    sample_cli(Namespace(model=f"{names['unet']}@champion", count=3, out=str(out), label=1, steps=6, guidance=None,
                         prompt=None, length=None, temperature=None, top_k=None, seed=4, exports=None,
                         inpaint=str(tmp_path / "img.png"), mask=str(tmp_path / "mask.png"), jump=2, resample=2,
                         resize=False), tmp_path)
    for i, x in enumerate(ours):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"cli-{i + 1}.png").convert("L")), x)

    rows = dict(body, inpaint={"image": image.tolist(), "mask": regenerate.tolist(), "jump": 2, "resample": 2})
    assert c.post(f"/v1/models/{names['unet']}/generate", json=rows).json()["images"] == r.json()["images"]
    unconditional = c.post(f"/v1/models/{names['unet']}/generate",
                           json={"inpaint": {"image": image.tolist(), "mask": regenerate.tolist()}})
    assert unconditional.status_code == 200 and len(unconditional.json()["images"]) == 1


def bad(kind: str = "unet", **inpaint):
    image, regenerate = digit_and_mask()
    return kind, {"inpaint": {"image": image.tolist(), "mask": regenerate.tolist(), **inpaint}}


@pytest.mark.parametrize("case, field, problem", [
    (lambda: bad(mask=png(np.zeros((4, 4)))), "inpaint", "image and mask must be of one form"),
    (lambda: bad(image=png(np.zeros((8, 8))), mask=png(np.zeros((6, 6)))), "inpaint.mask",
     "6x6 pixels, the image is 8x8; give a mask of the image's size"),
    (lambda: bad(image=png(np.zeros((8, 8))), mask=png(np.zeros((8, 8)))), "inpaint.mask",
     "nothing to fill (all black"),
    (lambda: bad(image=png(np.zeros((8, 8)), "RGB"), mask=png(np.full((8, 8), 16))), "inpaint.image",
     "3 channels (RGB), the model takes 1 (grayscale)"),
    (lambda: bad(image=png(np.zeros((10, 10))), mask=png(np.full((10, 10), 16))), "inpaint.image",
     'the model takes 8x8; give a 8x8 image or add "resize": true'),
    (lambda: bad(image="%%%", mask="%%%"), "inpaint.image", "not valid base64"),
    (lambda: bad(image=base64.b64encode(b"no png").decode(), mask=png(np.zeros((8, 8)))), "inpaint.image",
     "not an image PIL can read"),
    (lambda: bad(image=[[0] * 8] * 7), "inpaint.image", "8x7 values, the model takes 8x8"),
    (lambda: bad(image=[[17] * 8] * 8), "inpaint.image", "values must be in 0..16"),
    (lambda: bad(mask=[[2] * 8] * 8), "inpaint.mask", "values must be in 0..1 (1: regenerate, 0: keep)"),
    (lambda: bad(mask=[[0] * 8] * 8), "inpaint.mask", "nothing to fill"),
    (lambda: bad(mask="x" * 8), "inpaint", "image and mask must be of one form"),
    (lambda: bad(image=[["a"] * 8] * 8), "inpaint.image", "expected 8 rows of 8 integers"),
    (lambda: bad(jump=3), "inpaint.jump", "give inpaint.resample R > 1"),
    (lambda: bad(jump=10, resample=2), "inpaint.jump", "10 must be below the 10 sampling steps"),
    (lambda: bad(resample=21), "inpaint.resample", None),
    (lambda: bad(colour=1), "inpaint.colour", None),
    (lambda: bad(resize=True), "inpaint.resize", "only for PNG inputs"),
    (lambda: (bad()[0], {**bad()[1], "guidance": 2.0}), "guidance", "steers towards a label"),
    (lambda: (bad()[0], {**bad()[1], "label": 5}), "label", None),
    (lambda: bad("pixels"), "inpaint", "autoregressive model: over HTTP only diffusion models inpaint"),
])
def test_bad_images_and_masks_are_422_naming_the_field_in_one_line(client, case, field, problem):
    c, names, _ = client
    kind, body = case()
    r = c.post(f"/v1/models/{names[kind]}/generate", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["field"] == field, detail
    assert "\n" not in detail["problem"]
    if problem:
        assert problem in detail["problem"], detail
    ok = c.post(f"/v1/models/{names['unet']}/generate", json=bad()[1])
    assert ok.status_code == 200                        # the model is still served


def test_a_png_of_another_size_is_resized_only_when_asked(client):
    c, names, _ = client
    big = np.zeros((16, 16))
    big[4:12, 4:12] = 16
    mask = np.zeros((16, 16))
    mask[8:] = 16
    r = c.post(f"/v1/models/{names['unet']}/generate",
               json={"inpaint": {"image": png(big), "mask": png(mask), "resize": True}, "seed": 1})
    assert r.status_code == 200, r.text
    assert decode(r.json()["images"][0]).shape == (8, 8)


def test_the_openapi_page_documents_the_inpaint_field_without_dangling_references(client):
    c, _, _ = client
    doc = c.get("/openapi.json").json()
    body = doc["paths"]["/v1/models/{name}/generate"]["post"]["requestBody"]["content"]["application/json"]
    image_schema = body["schema"]["oneOf"][0]
    assert {"image", "mask", "jump", "resample", "resize"} <= set(image_schema["properties"]["inpaint"]["anyOf"][0]
                                                                   ["properties"])
    assert "#/$defs/" not in str(doc) and "inpaint" in body["examples"]
