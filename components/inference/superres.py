"""Super-resolution on onnxruntime alone (no PyTorch): `SuperResEngine`.

An exported super-resolution model (components/export.py, graph ``sr_denoiser``) is a denoiser
that also takes the low-res image to upscale:

    model.onnx  x [B,C,H,W] f32, t [B] i64, y [B] i64, lowres [B,C,H/f,W/f] f32 -> eps [B,C,H,W]

    engine = load_engine(Path("exports/digits-sr"))
    x = engine.upscale(engine.from_levels(lowres_levels), count=4)     # (4, C, 8, 8) in [-1, 1]; C = 1 grey, 3 colour

The denoising loop is components/sampling/diffusion.sample_loop (the PyTorch process runs the
same one) with the low-res image bound into every network call and the null class as the label.
Importing components.inference registers it in ENGINES, so load_engine reads such a folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from components.inference.engines import ENGINES, DiffusionEngine, Randn, numpy_randn
from components.sampling import diffusion
from components.sampling.superres import UPSCALE_FLAG, SuperResInputError


class SuperResEngine(DiffusionEngine):
    """A super-resolution denoiser graph plus the noise schedule: DDPM and DDIM upscaling."""

    graph = "sr_denoiser"

    def __init__(self, folder: Path, config: dict, session: Any, provider: str):
        super().__init__(folder, config, session, provider)
        self.factor = int(config["factor"])
        s = int(config["lowres_size"])
        self.lowres_shape = (self.shape[0], s, s)                                  # (C, H/f, W/f)

    def denoise_lowres(self, x: np.ndarray, t: np.ndarray, y: np.ndarray, lowres: np.ndarray) -> np.ndarray:
        """One network call: x (B,C,H,W), t (B,), y (B,), lowres (B,C,H/f,W/f) -> eps (B,C,H,W)."""
        return self.session.run(["eps"], {"x": np.ascontiguousarray(x, dtype=np.float32),
                                          "t": np.asarray(t, dtype=np.int64), "y": np.asarray(y, dtype=np.int64),
                                          "lowres": np.ascontiguousarray(lowres, dtype=np.float32)})[0]

    def upscale(self, lowres: np.ndarray, count: int = 1, *, sampler: Optional[str] = None,
                steps: Optional[int] = None, eta: Optional[float] = None, seed: int = 0,
                randn: Optional[Randn] = None, clip: bool = True) -> np.ndarray:
        """`count` upscalings of one low-res image (C, H/f, W/f) in [-1, 1], or one of each image of a
        batch (N, C, H/f, W/f) (count must then be 1); returns (count or N, C, H, W) float32 in [-1, 1]."""
        lowres = np.asarray(lowres, dtype=np.float32)
        if lowres.ndim == 3:
            lowres = lowres[None]
        elif count != 1:
            raise SuperResInputError(f"count: {count} upscalings of each of a batch of {len(lowres)} images; "
                                     "give one image, or count 1")
        if lowres.ndim != 4 or tuple(lowres.shape[1:]) != self.lowres_shape:
            raise SuperResInputError(f"{UPSCALE_FLAG}: shape {tuple(lowres.shape[1:])}, {self.name} upscales "
                                     f"{self.lowres_shape} (channels, height, width) to {self.shape}")
        if count < 1:
            raise SuperResInputError(f"count: must be at least 1, got {count}")
        lowres = np.repeat(lowres, count, axis=0) if count > 1 else lowres
        d = self.defaults
        sampler = sampler or d.get("sampler", "ddim")
        steps = int(steps if steps is not None else d.get("steps", min(50, self.timesteps)))
        eta = float(eta if eta is not None else d.get("eta", 0.0))
        y = np.zeros(len(lowres), dtype=np.int64)          # any valid class: guidance 0 feeds the null class
        timesteps = self.check(y, sampler, steps, eta, 0.0)
        randn = randn or numpy_randn(seed)

        def noise(shape: tuple) -> np.ndarray:
            return np.asarray(randn(shape), dtype=np.float32)

        def eps(x: np.ndarray, t: int) -> np.ndarray:
            return diffusion.guided_noise(lambda x, t, y: self.denoise_lowres(x, t, y, lowres), x, t, y,
                                          self.null_class, 0.0)

        x = diffusion.sample_loop(noise((len(lowres), *self.shape)), eps, noise, timesteps, self.alphas_cumprod,
                                  sampler, eta, clip)                               # from x_T ~ N(0, I)
        return x.astype(np.float32, copy=False)

    def _refuse(self, what: str) -> None:
        raise SuperResInputError(f"{UPSCALE_FLAG}: {self.name} is a super-resolution model: it {what} only from "
                                 f"a {self.lowres_shape[2]}x{self.lowres_shape[1]} image; give {UPSCALE_FLAG} "
                                 "IMAGE.png")

    def sample(self, labels, **kw) -> np.ndarray:   # noqa: D102  (no unconditional drawing)
        self._refuse("draws images")

    def inpaint(self, image, keep, count: int = 1, label=None, **kw) -> np.ndarray:   # noqa: D102
        self._refuse("makes images")


ENGINES[SuperResEngine.graph] = SuperResEngine   # load_engine reads graph "sr_denoiser" with this engine
