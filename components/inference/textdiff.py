"""The prompt-conditioned denoiser on onnxruntime alone (no PyTorch): `TextDiffusionEngine`.

An exported captions-unet (components/export.py, graph ``text_denoiser``) is a folder with two
graphs and config.json:

    text_encoder.onnx  prompt_ids [B,L] i64 -> states [B,L,D], prompt_mask [B,L]      once per request
    model.onnx         x, t, states, prompt_mask -> eps                                every step

    engine = load_engine(Path("exports/captions-unet"))
    x = engine.sample_prompts(["a thick, right-slanted seven"] * 4, guidance=2.0)    # (4, 1, 8, 8) in [-1, 1]

The prompts and the empty prompt (the null condition) are encoded once; the denoising loop and
guidance are components/sampling/diffusion.py's, as in PyTorch: the process's condition ids are
the rows of the encoded prompts, the null id the empty prompt's row. Importing
components.inference registers it in ENGINES.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from components.inference.engines import ENGINES, DiffusionEngine, Randn, numpy_randn
from components.inference.sessions import InferenceError, make_session
from components.sampling import diffusion
from components.sampling.requests import FLAGS


class TextDiffusionEngine(DiffusionEngine):
    """Text encoder graph once per request, then the denoiser graph every step, with guidance."""

    graph = "text_denoiser"

    def __init__(self, folder: Path, config: dict, session: Any, provider: str, threads: Optional[int] = None):
        super().__init__(folder, config, session, provider)
        enc_file = (config.get("files") or {}).get("text_encoder", "text_encoder.onnx")
        self.text_encoder, _ = make_session(Path(folder) / enc_file, threads,
                                            prefer_gpu=provider != "CPUExecutionProvider")
        from components.tokenizer import PromptTokenizer  # numpy only

        self.tokenizer = PromptTokenizer(config["vocab"], int(config["context"]))

    def sample(self, labels: Sequence[int], **kw: Any) -> np.ndarray:
        raise InferenceError(f"{FLAGS['label']}: {self.name} draws images of a caption, not of a class; "
                             "give --prompt TEXT instead")

    def inpaint(self, *args: Any, **kw: Any) -> np.ndarray:
        raise InferenceError(f"{FLAGS['image']}: {self.name} does not inpaint yet; it draws whole images of "
                             "a --prompt")

    def smoke_prompt(self) -> str:
        """A prompt this model surely takes (one character of its captions): for smoke checks."""
        return next(c for c in self.tokenizer.vocab if not c.isspace())

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(states (N+1, L, D), mask (N+1, L)) of the prompts and, last, the empty prompt; bad prompts
        (empty, unknown characters, longer than the context) refused in one line naming --prompt."""
        for p in prompts:
            self.tokenizer.encode_prompt(p, required=True)
        ids, _ = self.tokenizer.batch(list(prompts) + [""])
        states, mask = self.text_encoder.run(["states", "prompt_mask"], {"prompt_ids": ids})
        return states, mask

    def sample_prompts(self, prompts: Sequence[str], *, sampler: Optional[str] = None, steps: Optional[int] = None,
                       eta: Optional[float] = None, guidance: Optional[float] = None, seed: int = 0,
                       randn: Optional[Randn] = None, clip: bool = True) -> np.ndarray:
        """One image per prompt, (N, C, H, W) float32 in [-1, 1]; defaults from the model's params."""
        d = self.defaults
        sampler = sampler or d.get("sampler", "ddim")
        steps = int(steps if steps is not None else d.get("steps", min(50, self.timesteps)))
        eta = float(eta if eta is not None else d.get("eta", 0.0))
        guidance = float(guidance if guidance is not None else d.get("guidance", 1.0))
        n = len(prompts)
        rows = np.arange(n, dtype=np.int64)
        timesteps = diffusion.check_request(rows, max(n, 1), self.timesteps, steps, sampler, eta, guidance,
                                            FLAGS, self.name)
        states, mask = self.encode(prompts)

        def denoise(x: np.ndarray, t: np.ndarray, r: np.ndarray) -> np.ndarray:
            return self.session.run(["eps"], {"x": np.ascontiguousarray(x, dtype=np.float32),
                                              "t": np.asarray(t, dtype=np.int64),
                                              "states": states[r], "prompt_mask": mask[r]})[0]
        randn = randn or numpy_randn(seed)

        def noise(shape: tuple) -> np.ndarray:
            return np.asarray(randn(shape), dtype=np.float32)

        x = diffusion.sample_loop(noise((n, *self.shape)),
                                  lambda x, t: diffusion.guided_noise(denoise, x, t, rows, n, guidance),
                                  noise, timesteps, self.alphas_cumprod, sampler, eta, clip)
        return x.astype(np.float32, copy=False)


ENGINES[TextDiffusionEngine.graph] = TextDiffusionEngine
