"""Sampling on onnxruntime alone: no PyTorch, directly or through components.models.

An exported model is a folder (``exports/<key>/``, or the run artifact ``onnx/`` of a registered
version) holding ``model.onnx`` and ``config.json`` (everything this engine needs: shapes, the
noise schedule, the vocabulary; see components/export.py). One engine per graph kind:

    denoiser   (x [B,C,H,W] f32, t [B] i64, y [B] i64) -> eps        U-Net, DiT
    causal_lm  (input_ids [B,T] i64, past_kv [L,2,B,nh,P,hs] f32)
                 -> logits [B,T,V], present_kv [L,2,B,nh,P+T,hs]       GPT (text, digit pixels)
    masked_lm  input_ids [B,T] i64 (with [MASK]) -> logits [B,T,V-1]   masked diffusion LM (K steps)

    engine = load_engine(Path("exports/digits-unet"))
    x = engine.sample(labels=np.arange(10), steps=50, guidance=2.0)   # (10, 1, 8, 8) in [-1, 1]
    engine = load_engine(Path("exports/pydoc-gpt"))
    texts = engine.sample_text("Return the ", length=200, count=2, temperature=0.8)

The diffusion maths (timesteps, DDPM/DDIM steps, guidance) mirrors components/models/diffusion.py
line for line in numpy; tests check both give the same images from the same noise.
`sample_cli` is `genflow sample`: it resolves a registered version (or a local folder), samples
and writes a PNG grid or a text file. A new graph kind is one Engine subclass and one entry in
ENGINES (``masked_lm``: MaskedLMEngine, which mirrors components/models/mdlm.py's sampler).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from components.files import atomic_file, write_text

# Heavy imports (onnxruntime, mlflow, PIL) happen inside functions: the CLI imports this module.

CONFIG_FILE = "config.json"
PARITY_FILE = "parity.json"
DEFAULT_ALIAS = "champion"
CHUNK = 256  # images generated per batch by `genflow sample`

Randn = Callable[[tuple], np.ndarray]  # shape -> float32 standard normal draws


class InferenceError(ValueError):
    """A sampling request or an exported model that cannot be used; the message is one line."""


# ---------------------------------------------------------------------------
# onnxruntime sessions
# ---------------------------------------------------------------------------

def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: Optional[int] = None) -> Any:
    """intra-op threads = cores, no spinning (it stalls shared machines), all graph optimisations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or cpu_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: the CUDA fallback's warnings are reported by us instead
    return so


def make_session(path: Path, threads: Optional[int] = None, prefer_gpu: bool = True) -> tuple[Any, str]:
    """An InferenceSession on the best provider that actually works; returns (session, provider).

    CUDAExecutionProvider when onnxruntime lists it and the session really gets it (a CUDA build
    without CUDA libraries lists it but falls back), CPUExecutionProvider otherwise.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"{path}: missing; export the model again (genflow stage export <model>)")
    providers = ["CPUExecutionProvider"]
    if prefer_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        with warnings.catch_warnings():  # a listed-but-unusable CUDA provider warns; we report the outcome
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    except Exception as e:  # InvalidProtobuf, InvalidGraph, Fail: all mean the file is unusable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InferenceError(f"{path}: not a usable ONNX model ({first[:200]}); export it again") from None
    return session, session.get_providers()[0]


# ---------------------------------------------------------------------------
# Diffusion maths (numpy mirror of components/models/diffusion.py, which imports torch)
# ---------------------------------------------------------------------------

def sampling_timesteps(timesteps: int, steps: int) -> list[int]:
    """The `steps` timesteps a sampler visits, from T-1 down ("trailing" spacing)."""
    if not 1 <= steps <= timesteps:
        raise InferenceError(f"--steps: {steps} sampling steps asked for, but the model was trained with "
                             f"{timesteps} diffusion timesteps; use 1..{timesteps}")
    ts = np.round(np.arange(timesteps, 0, -timesteps / steps)).astype(np.int64) - 1
    return [int(t) for t in ts]


def predict_x0(x, eps, abar_t: float, clip: bool = True):
    x0 = (x - (1.0 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
    return x0.clip(-1.0, 1.0) if clip else x0


def ddim_step(x, eps, abar_t: float, abar_prev: float, eta: float = 0.0, noise=None, clip: bool = True):
    """DDIM update x_t -> x_prev (Song et al. eq. 12); eta=0 is deterministic."""
    x0 = predict_x0(x, eps, abar_t, clip)
    if clip:  # keep eps consistent with the clipped x0
        eps = (x - abar_t ** 0.5 * x0) / (1.0 - abar_t) ** 0.5
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
    x_prev = abar_prev ** 0.5 * x0 + max(1 - abar_prev - sigma ** 2, 0.0) ** 0.5 * eps
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev


def ddpm_step(x, eps, abar_t: float, abar_prev: float, noise=None, clip: bool = True):
    """Ancestral DDPM update: a draw from the posterior q(x_prev | x_t, x0_hat) (Ho et al. eq. 7)."""
    beta = 1.0 - abar_t / abar_prev
    x0 = predict_x0(x, eps, abar_t, clip)
    c0 = abar_prev ** 0.5 * beta / (1 - abar_t)
    ct = (1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar_t)
    mean = c0 * x0 + ct * x
    var = beta * (1 - abar_prev) / (1 - abar_t)
    if var > 0:
        mean = mean + var ** 0.5 * noise
    return mean


def guided_eps(eps_cond, eps_uncond, guidance: float):
    """Classifier-free guidance: eps_uncond + w (eps_cond - eps_uncond)."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def numpy_randn(seed: int) -> Randn:
    rng = np.random.default_rng(seed)
    return lambda shape: rng.standard_normal(shape, dtype=np.float32)


# ---------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------

class Engine:
    """One exported model on onnxruntime: its folder, config.json and session."""

    graph = ""

    def __init__(self, folder: Path, config: dict, session: Any, provider: str):
        self.folder, self.config, self.session, self.provider = Path(folder), config, session, provider
        self.name = config.get("key") or self.folder.name
        want = [i["name"] for i in config.get("inputs", [])]
        have = [i.name for i in session.get_inputs()]
        if want and want != have:
            raise InferenceError(f"{self.folder / config['files']['model']}: graph inputs {have} do not match "
                                 f"config.json's {want}; export the model again")

    @property
    def kind(self) -> str:
        return self.config.get("kind", "image")


class DiffusionEngine(Engine):
    """A denoiser graph plus the noise schedule: DDPM and DDIM sampling with guidance."""

    graph = "denoiser"

    def __init__(self, folder: Path, config: dict, session: Any, provider: str):
        super().__init__(folder, config, session, provider)
        self.alphas_cumprod = np.asarray(config["alphas_cumprod"], dtype=np.float64)  # (T,)
        self.timesteps = len(self.alphas_cumprod)
        self.num_classes = int(config["num_classes"])
        self.null_class = int(config.get("null_class", self.num_classes))
        self.shape = (int(config["channels"]), int(config["image_size"]), int(config["image_size"]))  # (C, H, W)
        self.defaults = dict(config.get("sample") or {})

    def denoise(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        """One network call: x (B,C,H,W) f32, t (B,) i64, y (B,) i64 -> eps (B,C,H,W)."""
        return self.session.run(["eps"], {"x": np.ascontiguousarray(x, dtype=np.float32),
                                          "t": np.asarray(t, dtype=np.int64), "y": np.asarray(y, dtype=np.int64)})[0]

    def eps(self, x: np.ndarray, t: int, y: np.ndarray, guidance: float) -> np.ndarray:
        """Noise prediction at one timestep with classifier-free guidance (cond + uncond in one call)."""
        B = x.shape[0]
        tt = np.full((B,), t, dtype=np.int64)
        if guidance == 1.0:
            return self.denoise(x, tt, y)
        null = np.full_like(y, self.null_class)
        if guidance == 0.0:
            return self.denoise(x, tt, null)
        out = self.denoise(np.concatenate([x, x]), np.concatenate([tt, tt]), np.concatenate([y, null]))
        return guided_eps(out[:B], out[B:], guidance)

    def check(self, labels: np.ndarray, sampler: str, steps: int, eta: float, guidance: float) -> list[int]:
        """Refuse a bad request before any network call; returns the timesteps to visit."""
        if sampler not in ("ddpm", "ddim"):
            raise InferenceError(f"sampler: expected 'ddpm' or 'ddim', got {sampler!r}")
        if not (guidance >= 0 and np.isfinite(guidance)):
            raise InferenceError(f"--guidance: must be >= 0 (0: unconditional, 1: conditional only, "
                                 f">1: stronger), got {guidance}")
        if not eta >= 0:
            raise InferenceError(f"eta: must be >= 0, got {eta}")
        if labels.size == 0:
            raise InferenceError("count: nothing to sample; ask for at least one image")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.size:
            raise InferenceError(f"--label: {self.name} knows classes 0..{self.num_classes - 1}, "
                                 f"got {int(bad[0])}")
        return sampling_timesteps(self.timesteps, steps)

    def sample(self, labels: Sequence[int], *, sampler: Optional[str] = None, steps: Optional[int] = None,
               eta: Optional[float] = None, guidance: Optional[float] = None, seed: int = 0,
               randn: Optional[Randn] = None, clip: bool = True) -> np.ndarray:
        """Draw one image per label; returns (B, C, H, W) float32 in [-1, 1].

        Defaults (sampler, steps, eta, guidance) come from the model's params at export time.
        randn(shape) supplies the noise (x_T first, then one draw per stochastic step);
        default: numpy's generator seeded with `seed`.
        """
        d = self.defaults
        sampler = sampler or d.get("sampler", "ddim")
        steps = int(steps if steps is not None else d.get("steps", min(50, self.timesteps)))
        eta = float(eta if eta is not None else d.get("eta", 0.0))
        guidance = float(guidance if guidance is not None else d.get("guidance", 1.0))
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
        timesteps = self.check(y, sampler, steps, eta, guidance)
        randn = randn or numpy_randn(seed)
        abar = self.alphas_cumprod
        x = np.asarray(randn((len(y), *self.shape)), dtype=np.float32)            # x_T ~ N(0, I)
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            abar_t, abar_prev = float(abar[t]), (float(abar[t_prev]) if t_prev >= 0 else 1.0)
            eps = self.eps(x, t, y, guidance)
            stochastic = t_prev >= 0 and (sampler == "ddpm" or eta > 0)
            noise = np.asarray(randn(x.shape), dtype=np.float32) if stochastic else None
            if sampler == "ddpm":
                x = ddpm_step(x, eps, abar_t, abar_prev, noise, clip)
            else:
                x = ddim_step(x, eps, abar_t, abar_prev, eta, noise, clip)
        return x.astype(np.float32, copy=False)

    def to_levels(self, x: np.ndarray) -> np.ndarray:
        """[-1, 1] -> integer grey levels 0..levels-1 (the data's quantisation), uint8."""
        levels = int(self.config.get("levels", 256))
        return np.rint((np.clip(x, -1.0, 1.0) + 1.0) / 2.0 * (levels - 1)).astype(np.uint8)


class TextEngine(Engine):
    """What the two language-model engines share: sampling defaults, the tokenizer, a text request."""

    def __init__(self, folder: Path, config: dict, session: Any, provider: str):
        super().__init__(folder, config, session, provider)
        self.vocab_size, self.block_size = int(config["vocab_size"]), int(config["block_size"])
        self.defaults = dict(config.get("sample") or {})
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from components.tokenizer import CharTokenizer  # numpy only

            if not self.config.get("vocab"):
                raise InferenceError(f"{self.name}: config.json has no vocab; it is not a text model")
            self._tokenizer = CharTokenizer(self.config["vocab"])
        return self._tokenizer

    def text_request(self, prompt: Optional[str], length: Optional[int], temperature: Optional[float],
                     top_k: Optional[int], count: int, default_length: int) -> tuple[np.ndarray, int, float, int]:
        """(prompt ids, length, temperature, top_k): the arguments given, else the model's sample defaults."""
        d = self.defaults
        prompt = d.get("prompt", "") if prompt is None else prompt
        length = int(length if length is not None else d.get("length", default_length))
        temperature = float(temperature if temperature is not None else d.get("temperature", 1.0))
        top_k = int(top_k if top_k is not None else d.get("top_k", 0))
        if count < 1:
            raise InferenceError(f"--count: must be at least 1, got {count}")
        try:
            start = self.tokenizer.encode(prompt, strict=True)
        except ValueError as e:
            raise InferenceError(f"--prompt: {e}") from None
        return start, length, temperature, top_k


class CausalLMEngine(TextEngine):
    """A GPT graph with a key/value cache: one graph for prefill (empty past) and decoding."""

    graph = "causal_lm"

    def __init__(self, folder: Path, config: dict, session: Any, provider: str):
        super().__init__(folder, config, session, provider)
        c = config
        self.n_layer, self.n_head, self.head_dim = int(c["n_layer"]), int(c["n_head"]), int(c["head_dim"])

    # --- the network ---------------------------------------------------------

    def empty_past(self, batch: int) -> np.ndarray:
        """A past of length 0: (n_layer, 2, B, n_head, 0, head_dim)."""
        return np.zeros((self.n_layer, 2, batch, self.n_head, 0, self.head_dim), dtype=np.float32)

    def forward(self, ids: np.ndarray, past: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids (B, T) i64, past (L,2,B,nh,P,hs) -> logits (B, T, V), present (L,2,B,nh,P+T,hs)."""
        # Plain numpy in and out: feeding present back as an OrtValue (IO binding) was no faster for
        # pydoc-gpt's cache (at most 4 x 2 x 64 x 128 floats per row)
        logits, present = self.session.run(["logits", "present_kv"],
                                           {"input_ids": np.ascontiguousarray(ids, dtype=np.int64),
                                            "past_kv": past})
        return logits, present

    # --- generation ----------------------------------------------------------

    def check_sampling(self, prompt_len: int, max_new_tokens: int, temperature: float, top_k: int) -> None:
        if not (temperature > 0 and np.isfinite(temperature)):
            raise InferenceError(f"--temperature: must be > 0 (1.0 samples the model as trained), got {temperature}")
        if not 0 <= top_k <= self.vocab_size:
            raise InferenceError(f"--top-k: must be between 0 (off) and the vocabulary size "
                                 f"{self.vocab_size}, got {top_k}")
        if max_new_tokens < 1:
            raise InferenceError(f"--length: must be at least 1 token, got {max_new_tokens}")
        if prompt_len < 1:
            raise InferenceError("--prompt: empty; give at least one token to start from")
        if prompt_len > self.block_size:
            raise InferenceError(f"--prompt: {prompt_len} tokens, longer than the model's context "
                                 f"block_size={self.block_size}; shorten it")

    @staticmethod
    def next_token(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator,
                   allowed: Optional[np.ndarray] = None) -> np.ndarray:
        """Sample one id per row from logits (B, V); `allowed` (V,) bool masks the rest out."""
        z = logits.astype(np.float64) / temperature
        if allowed is not None:
            z = np.where(allowed[None, :], z, -np.inf)
        if top_k:
            kth = np.sort(z, axis=-1)[:, -top_k][:, None]                          # (B, 1)
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max(axis=-1, keepdims=True))
        cdf = np.cumsum(p, axis=-1)                                                # (B, V) unnormalised
        u = rng.random((z.shape[0], 1)) * cdf[:, -1:]
        return np.minimum((cdf <= u).sum(axis=-1), z.shape[1] - 1).astype(np.int64)[:, None]  # (B, 1)

    def generate(self, ids: np.ndarray, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 *, seed: int = 0, rng: Optional[np.random.Generator] = None,
                 allowed: Optional[np.ndarray] = None, use_cache: bool = True) -> np.ndarray:
        """Sample `max_new_tokens` after the prompt ids (B, T); returns (B, T + new).

        Same as GPT.generate: with the cache (default), once it holds block_size tokens the last
        3/4 of the context is re-encoded and decoding goes on from there; without it
        (use_cache=False, a baseline), every token re-runs the last block_size tokens.
        """
        ids = np.asarray(ids, dtype=np.int64)
        B, T = ids.shape
        self.check_sampling(T, max_new_tokens, temperature, top_k or 0)
        rng = rng or np.random.default_rng(seed)
        block = self.block_size
        if not use_cache:
            for _ in range(max_new_tokens):  # logits only: present_kv is not wanted
                logits = self.session.run(["logits"], {"input_ids": np.ascontiguousarray(ids[:, -block:]),
                                                       "past_kv": self.empty_past(B)})[0]
                ids = np.concatenate([ids, self.next_token(logits[:, -1], temperature, top_k or 0, rng, allowed)], 1)
            return ids
        logits, past = self.forward(ids, self.empty_past(B))                       # prefill
        for i in range(max_new_tokens):
            nxt = self.next_token(logits[:, -1], temperature, top_k or 0, rng, allowed)  # (B, 1)
            ids = np.concatenate([ids, nxt], axis=1)
            if i == max_new_tokens - 1:
                break
            if past.shape[4] >= block:  # cache full: keep the most recent 3/4 of the context
                keep = max(1, block * 3 // 4)
                logits, past = self.forward(ids[:, -keep:], self.empty_past(B))
            else:
                logits, past = self.forward(nxt, past)
        return ids

    # --- text ----------------------------------------------------------------

    def sample_text(self, prompt: Optional[str] = None, *, length: Optional[int] = None, count: int = 1,
                    temperature: Optional[float] = None, top_k: Optional[int] = None, seed: int = 0) -> list[str]:
        """`count` texts, each the prompt followed by `length` generated characters."""
        start, length, temperature, top_k = self.text_request(prompt, length, temperature, top_k, count, 256)
        tok, lead = self.tokenizer, 0
        if len(start) == 0:  # no prompt: start from a document break, as the training text does
            start, lead = tok.encode("\n" if "\n" in tok.stoi else tok.vocab[0]), 1
        self.check_sampling(len(start), length, temperature, top_k)
        ids = self.generate(np.tile(start, (count, 1)), length, temperature, top_k, seed=seed)
        return [tok.decode(row[lead:]) for row in ids]

    # --- digit pixels --------------------------------------------------------

    def sample_digits(self, labels: Sequence[int], *, temperature: Optional[float] = None,
                      top_k: Optional[int] = None, seed: int = 0) -> np.ndarray:
        """One image per label: [class token] then image_size^2 pixel tokens; returns levels (B,1,H,W) uint8."""
        c, d = self.config, self.defaults
        if self.kind != "image":
            raise InferenceError(f"{self.name}: a text model; it does not draw images")
        num_classes, levels, size = int(c["num_classes"]), int(c["levels"]), int(c["image_size"])
        class_offset, pixel_offset = int(c["class_token_offset"]), int(c.get("pixel_token_offset", 0))
        temperature = float(temperature if temperature is not None else d.get("temperature", 1.0))
        top_k = int(top_k if top_k is not None else d.get("top_k", 0))
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
        if y.size == 0:
            raise InferenceError("count: nothing to sample; ask for at least one image")
        bad = y[(y < 0) | (y >= num_classes)]
        if bad.size:
            raise InferenceError(f"--label: {self.name} knows classes 0..{num_classes - 1}, got {int(bad[0])}")
        if not 0 <= top_k <= levels:  # sampling runs over the grey levels only
            raise InferenceError(f"--top-k: must be between 0 (off) and the {levels} grey levels, got {top_k}")
        allowed = np.zeros(self.vocab_size, dtype=bool)  # pixels only: a class token is never a pixel
        allowed[pixel_offset:pixel_offset + levels] = True
        ids = self.generate((class_offset + y)[:, None], size * size, temperature, top_k, seed=seed, allowed=allowed)
        pixels = ids[:, 1:] - pixel_offset                                         # (B, H*W) in 0..levels-1
        return pixels.reshape(-1, 1, size, size).astype(np.uint8)


# ---------------------------------------------------------------------------
# Masked diffusion language models (numpy mirror of components/models/mdlm.py's sampler)
# ---------------------------------------------------------------------------

def unmask_counts(length: int, steps: int) -> list[int]:
    """Positions each of the K steps unmasks: floor(length * k / K) stay masked at t_k = k/K."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InferenceError(f"--steps: K, the number of denoising steps, must be an integer >= 1, got {steps!r}")
    return [length * k // steps - length * (k - 1) // steps for k in range(steps, 0, -1)]


def draw_tokens(logits: np.ndarray, u: np.ndarray, temperature: float = 1.0, top_k: int = 0) -> np.ndarray:
    """Inverse-CDF draws: logits (..., V), u (...) uniform in [0, 1) -> ids (...) (float64 maths)."""
    z = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(z, axis=-1)[..., -top_k][..., None]
        z = np.where(z < kth, -np.inf, z)
    cdf = np.cumsum(np.exp(z - z.max(axis=-1, keepdims=True)), axis=-1)        # (..., V) unnormalised
    ids = (cdf < u[..., None] * cdf[..., -1:]).sum(axis=-1)
    return np.minimum(ids, z.shape[-1] - 1).astype(np.int64)


class MaskedLMEngine(TextEngine):
    """A masked diffusion language model: the whole text is written in K parallel denoising steps.

    The graph maps ids with [MASK] (B, T) to logits over the other ids (B, T, V - 1); there is
    no cache: every step reads the whole sequence. The prompt stays as given (never masked).
    """

    graph = "masked_lm"

    def __init__(self, folder: Path, config: dict, session: Any, provider: str):
        super().__init__(folder, config, session, provider)
        self.mask_id = int(config.get("mask_id", self.vocab_size - 1))

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """ids (B, T) i64 with [MASK] -> logits (B, T, V - 1)."""
        return self.session.run(["logits"], {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)})[0]

    def check_sampling(self, prompt_len: int, length: int, steps: int, temperature: float, top_k: int) -> None:
        unmask_counts(1, steps)  # K >= 1
        if not (temperature > 0 and np.isfinite(temperature)):
            raise InferenceError(f"--temperature: must be > 0 (1.0 samples the model as trained), got {temperature}")
        if not 0 <= top_k <= self.mask_id:
            raise InferenceError(f"--top-k: must be between 0 (off) and the vocabulary size {self.mask_id}, got {top_k}")
        if length < 1:
            raise InferenceError(f"--length: must be at least 1 token, got {length}")
        if prompt_len + length > self.block_size:
            raise InferenceError(f"--length: the prompt ({prompt_len}) plus {length} tokens exceed the model's "
                                 f"block_size={self.block_size}; a masked model writes the whole sequence at once")

    def generate(self, prompt: np.ndarray, batch: int, length: int, steps: int, temperature: float = 1.0,
                 top_k: int = 0, *, seed: int = 0, rand: Optional[Callable[[tuple], np.ndarray]] = None) -> np.ndarray:
        """`batch` sequences: the prompt ids (P,) then `length` ids written in K = steps steps; (B, P + length).

        Same as MaskedDiffusion.sample: per step, position scores (B, P + length) then token
        uniforms (B, n) from rand(shape) (default: numpy's generator seeded with `seed`).
        """
        prompt = np.asarray(prompt, dtype=np.int64).reshape(-1)
        self.check_sampling(len(prompt), length, steps, temperature, top_k or 0)
        if rand is None:
            rng = np.random.default_rng(seed)
            rand = rng.random
        x = np.concatenate([np.tile(prompt, (batch, 1)),
                            np.full((batch, length), self.mask_id, dtype=np.int64)], axis=1)  # (B, P + L)
        rows = np.arange(batch)[:, None]
        for n in unmask_counts(length, steps):
            if n == 0:
                continue
            logits = self.logits(x)                                                # (B, P + L, V - 1)
            scores = np.where(x == self.mask_id, rand(x.shape), 2.0)
            chosen = np.argsort(scores, axis=1, kind="stable")[:, :n]              # (B, n) random masked positions
            tokens = draw_tokens(logits[rows, chosen], np.asarray(rand((batch, n))), temperature, top_k or 0)
            x[rows, chosen] = tokens
        return x

    def sample_text(self, prompt: Optional[str] = None, *, length: Optional[int] = None, count: int = 1,
                    temperature: Optional[float] = None, top_k: Optional[int] = None, seed: int = 0,
                    steps: Optional[int] = None) -> list[str]:
        """`count` texts, each the prompt followed by `length` characters written in K = steps steps."""
        start, length, temperature, top_k = self.text_request(prompt, length, temperature, top_k, count,
                                                              self.block_size)
        steps = int(steps if steps is not None else self.defaults.get("steps", 32))
        ids = self.generate(start, count, length, steps, temperature, top_k, seed=seed)
        return [self.tokenizer.decode(row) for row in ids]


ENGINES: dict[str, type[Engine]] = {"denoiser": DiffusionEngine, "causal_lm": CausalLMEngine,
                                    "masked_lm": MaskedLMEngine}


# ---------------------------------------------------------------------------
# Loading an exported folder
# ---------------------------------------------------------------------------

def read_config(folder: Path) -> dict:
    """config.json of an exported model, checked enough to give one clear line when it is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InferenceError(f"{folder}: no exported model here; run `genflow stage export {folder.name}` "
                             "or give the folder that holds model.onnx and config.json")
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise InferenceError(f"{path}: missing; export the model again (genflow stage export {folder.name})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InferenceError(f"{path}: not valid JSON ({e}); export the model again") from None
    if not isinstance(config, dict) or config.get("graph") not in ENGINES:
        graph = config.get("graph") if isinstance(config, dict) else None
        raise InferenceError(f"{path}: graph {graph!r} is not one this engine runs "
                             f"({', '.join(ENGINES)}); export the model again")
    parity = folder / PARITY_FILE
    if parity.is_file():
        try:
            result = json.loads(parity.read_text())
        except ValueError:
            result = {}
        if result.get("passed") is False:
            raise InferenceError(f"{parity}: this export failed its parity check against PyTorch "
                                 f"({result.get('reason', 'see the file')}); do not use it")
    return config


def load_engine(folder: Path, *, threads: Optional[int] = None, prefer_gpu: bool = True) -> Engine:
    """The engine for an exported model folder (model.onnx + config.json)."""
    folder = Path(folder)
    config = read_config(folder)
    model_file = (config.get("files") or {}).get("model", "model.onnx")
    config.setdefault("files", {})["model"] = model_file
    session, provider = make_session(folder / model_file, threads, prefer_gpu)
    return ENGINES[config["graph"]](folder, config, session, provider)


# ---------------------------------------------------------------------------
# Where a model comes from: the MLflow registry or a local folder
# ---------------------------------------------------------------------------

_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9][\w.\-]*?)(?:@(?P<alias>[\w.\-]+)|:(?P<version>\d+))?$")


def parse_model_spec(spec: str) -> tuple[str, Optional[str], Optional[str]]:
    """'digits-unet' -> (name, 'champion', None); 'x@challenger' -> alias; 'x:3' -> version."""
    m = _SPEC.match(spec.strip())
    if not m:
        raise InferenceError(f"model {spec!r}: expected MODEL, MODEL@alias or MODEL:version, "
                             "e.g. digits-unet@champion or pydoc-gpt:3")
    alias, version = m["alias"], m["version"]
    return m["name"], (alias or (None if version else DEFAULT_ALIAS)), version


def _tracking_uri(root: Path) -> str:
    try:
        from components.tracking import tracking_uri
    except ImportError:
        env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        return env or f"sqlite:///{Path(root).resolve() / '.genflow' / 'mlflow.db'}"
    return tracking_uri(Path(root))


def _registry_version(name: str, alias: Optional[str], version: Optional[str], uri: str) -> Any:
    """The ModelVersion for name@alias or name:version, or one line saying what exists."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise InferenceError(f"no MLflow registry at {uri}: run `genflow run` first, set MLFLOW_TRACKING_URI, "
                             "or sample from a folder with --exports DIR")
    client = MlflowClient(uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        try:
            known = sorted(m.name for m in client.search_registered_models())
        except MlflowException:
            known = []
        raise InferenceError(f"model {name!r}: not in the MLflow registry at {uri}; registered: "
                             f"{', '.join(known) or 'none'}") from None
    aliases = dict(getattr(model, "aliases", {}) or {})
    try:
        if version is not None:
            return client.get_model_version(name, version)
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        if version is not None:
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
            raise InferenceError(f"{name}:{version}: no such version in the MLflow registry; "
                                 f"{name} has versions: {', '.join(map(str, versions)) or 'none'}") from None
        known = ", ".join(f"{a} (version {v})" for a, v in sorted(aliases.items())) or "none"
        raise InferenceError(f"{name}@{alias}: no such alias; {name} has aliases: {known}") from None


def download_version(name: str, alias: Optional[str], version: Optional[str], root: Path, dst: Path) -> Path:
    """Download a registered version's exported folder into `dst`; returns the folder.

    The run's artifact folder ``onnx/`` (the whole exports/<key>/ folder) is used when present;
    otherwise the registered ONNX model plus the run's ``extras/`` (config.json).
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    uri = _tracking_uri(root)
    mv = _registry_version(name, alias, version, uri)
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
        raise InferenceError(f"{where}: could not download its ONNX files from run {mv.run_id} "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    onnx_files = sorted(model_dir.rglob("*.onnx"))
    if not onnx_files or not (extras / CONFIG_FILE).is_file():
        raise InferenceError(f"{where}: run {mv.run_id} holds no exported model (model.onnx + config.json); "
                             "register it again with `genflow run`")
    shutil.copy2(onnx_files[0], folder / "model.onnx")
    for p in extras.iterdir():
        if p.is_file() and not (folder / p.name).exists():
            shutil.copy2(p, folder / p.name)
    return folder


# ---------------------------------------------------------------------------
# Output files (atomic: a reader never sees half a file, a failure leaves none)
# ---------------------------------------------------------------------------

def image_grid(levels: np.ndarray, n_levels: int, rows: int, scale: int = 4, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) grey levels -> one uint8 picture, `rows` rows, each pixel scale x scale, grey gaps
    (the layout of the evaluation's samples.png: 0 is black, the top level white)."""
    N, C, H, W = levels.shape
    cols = -(-N // rows)
    grey = (levels[:, 0].astype(np.float64) * (255.0 / max(n_levels - 1, 1))).round().astype(np.uint8)  # (N, H, W)
    grey = grey.repeat(scale, axis=1).repeat(scale, axis=2)                        # (N, sH, sW)
    h, w = H * scale, W * scale
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 128, dtype=np.uint8)
    for i in range(N):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = grey[i]
    return canvas


def write_png(path: Path, picture: np.ndarray) -> None:
    from PIL import Image

    with atomic_file(path) as tmp:
        Image.fromarray(picture, mode="L").save(tmp, format="PNG")


# ---------------------------------------------------------------------------
# genflow sample
# ---------------------------------------------------------------------------

def _arg(args: Any, name: str) -> Any:
    return getattr(args, name, None)


def _refuse_options(args: Any, engine: Engine, names: dict[str, str]) -> None:
    for attr, flag in names.items():
        if _arg(args, attr) is not None:
            raise InferenceError(f"{flag}: {engine.name} is a {engine.config.get('family', engine.graph)} "
                                 f"{engine.kind} model and has no such setting; drop it")


def _sample_images(args: Any, engine: Engine, count: Optional[int]) -> tuple[np.ndarray, int, int]:
    """Returns (levels (N,1,H,W), number of grey levels, grid rows)."""
    label = _arg(args, "label")
    classes = engine.config["num_classes"]
    if label is not None:
        n = count or 16
        labels, rows = np.full(n, label, dtype=np.int64), -(-n // 8)
    else:
        n = count or 8  # per class: one row per class
        labels, rows = np.repeat(np.arange(classes, dtype=np.int64), n), classes
    seed = int(_arg(args, "seed") or 0)
    chunks = [labels[i:i + CHUNK] for i in range(0, len(labels), CHUNK)]  # bounded memory for large -n
    if isinstance(engine, DiffusionEngine):
        _refuse_options(args, engine, {"prompt": "--prompt", "length": "--length",
                                       "temperature": "--temperature", "top_k": "--top-k"})
        randn = numpy_randn(seed)
        x = np.concatenate([engine.sample(c, steps=_arg(args, "steps"), guidance=_arg(args, "guidance"),
                                          randn=randn) for c in chunks])
        return engine.to_levels(x), int(engine.config.get("levels", 256)), rows
    _refuse_options(args, engine, {"prompt": "--prompt", "length": "--length", "steps": "--steps",
                                   "guidance": "--guidance"})
    levels = np.concatenate([engine.sample_digits(c, temperature=_arg(args, "temperature"),
                                                  top_k=_arg(args, "top_k"), seed=seed + i)
                             for i, c in enumerate(chunks)])
    return levels, int(engine.config["levels"]), rows


def _sample_texts(args: Any, engine: CausalLMEngine | MaskedLMEngine, count: Optional[int], title: str) -> str:
    masked = isinstance(engine, MaskedLMEngine)  # --steps is K, its number of denoising steps
    _refuse_options(args, engine, {"label": "--label", "guidance": "--guidance",
                                   **({} if masked else {"steps": "--steps"})})
    n = count or 4
    kw = {"steps": _arg(args, "steps")} if masked else {}
    texts = engine.sample_text(_arg(args, "prompt"), length=_arg(args, "length"), count=n,
                               temperature=_arg(args, "temperature"), top_k=_arg(args, "top_k"),
                               seed=int(_arg(args, "seed") or 0), **kw)
    parts = [f"# {title}: {n} samples on onnxruntime ({engine.provider})"]
    parts += [f"=== sample {i + 1} ===\n{t}" for i, t in enumerate(texts)]
    return "\n\n".join(parts) + "\n"


def sample_cli(args: Any, root: Path) -> Path:
    """`genflow sample MODEL[@alias|:version]`: generate with an exported model; returns the file written.

    The model comes from the MLflow registry (alias default 'champion'), or from DIR/<model>/ with
    --exports DIR. Images: a PNG grid, one row per class with -n images each (or -n images of
    --label). Text: -n samples of --length characters after --prompt. Default output:
    reports/samples/<model>-<alias|version|local>.png|.txt. Bad input raises InferenceError
    (one line) before anything is written.
    """
    root = Path(root)
    name, alias, version = parse_model_spec(str(_arg(args, "model") or ""))
    count = _arg(args, "count")
    if count is not None and count < 1:
        raise InferenceError(f"--count: must be at least 1, got {count}")
    for attr, flag in (("steps", "--steps"), ("length", "--length")):
        if _arg(args, attr) is not None and _arg(args, attr) < 1:
            raise InferenceError(f"{flag}: must be at least 1, got {_arg(args, attr)}")
    exports = _arg(args, "exports")
    tag = "local" if exports else (alias or version)
    with tempfile.TemporaryDirectory(prefix="genflow-sample-") as tmp:
        if exports:
            folder = Path(exports) / name
            if not folder.is_dir():
                have = sorted(p.parent.name for p in Path(exports).glob(f"*/{CONFIG_FILE}"))
                raise InferenceError(f"{folder}: no exported model {name!r}; found: {', '.join(have) or 'none'}")
        else:
            folder = download_version(name, alias, version, root, Path(tmp))
        engine = load_engine(folder)
        print(f"{name}: onnxruntime on {engine.provider}", flush=True)
        image = engine.kind == "image"
        out = Path(_arg(args, "out") or root / "reports" / "samples" / f"{name}-{tag}.{'png' if image else 'txt'}")
        if not out.is_absolute():
            out = root / out
        want = ".png" if image else ".txt"
        if out.suffix.lower() != want:
            raise InferenceError(f"--out {out}: {name} makes {'images' if image else 'text'}; "
                                 f"give a {want} path")
        if image:
            levels, n_levels, rows = _sample_images(args, engine, count)
            write_png(out, image_grid(levels, n_levels, rows))
        else:
            write_text(out, _sample_texts(args, engine, count, f"{name}@{tag}"))
    return out
