"""One engine per graph kind: an exported model folder on onnxruntime, sampled without torch.

    denoiser   (x [B,C,H,W] f32, t [B] i64, y [B] i64) -> eps        U-Net, DiT
    causal_lm  (input_ids [B,T] i64, past_kv [L,2,B,nh,P,hs] f32)
                 -> logits [B,T,V], present_kv [L,2,B,nh,P+T,hs]       GPT (text; pixels, grey or colour)
    masked_lm  input_ids [B,T] i64 (with [MASK]) -> logits [B,T,V-1]   masked diffusion LM (K steps)

The sampling maths (DDPM/DDIM steps, guidance, the unmasking schedule, token draws) come from
components/sampling/, the same functions the PyTorch processes run. A new graph kind is one
Engine subclass and one entry in ENGINES.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from components.inference.sessions import InferenceError, make_session
from components.layout import EXPORT_CONFIG_FILE
from components.sampling import diffusion, masked
from components.sampling.requests import (
    FLAGS,
    SamplingRequestError,
    check_labels,
    check_length,
    check_temperature,
    check_top_k,
)

CONFIG_FILE = EXPORT_CONFIG_FILE
PARITY_FILE = "parity.json"

Randn = Callable[[tuple], np.ndarray]  # shape -> float32 standard normal draws


def nchw_to_images(levels: np.ndarray, n_levels: int) -> np.ndarray:
    """Levels (N, C, H, W) -> images in [0, 1] float32: (N, H, W) for C == 1, (N, H, W, C) otherwise."""
    x = np.asarray(levels, dtype=np.float32) / max(int(n_levels) - 1, 1)
    return x[:, 0] if x.shape[1] == 1 else np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def numpy_randn(seed: int) -> Randn:
    rng = np.random.default_rng(seed)
    return lambda shape: rng.standard_normal(shape, dtype=np.float32)


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
        return diffusion.guided_noise(self.denoise, x, t, y, self.null_class, guidance)

    def check(self, labels: np.ndarray, sampler: str, steps: int, eta: float, guidance: float) -> list[int]:
        """Refuse a bad request before any network call; returns the timesteps to visit."""
        return diffusion.check_request(labels, self.num_classes, self.timesteps, steps, sampler, eta, guidance,
                                       FLAGS, self.name)

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

        def noise(shape: tuple) -> np.ndarray:
            return np.asarray(randn(shape), dtype=np.float32)

        x = diffusion.sample_loop(noise((len(y), *self.shape)), lambda x, t: self.eps(x, t, y, guidance), noise,
                                  timesteps, self.alphas_cumprod, sampler, eta, clip)   # from x_T ~ N(0, I)
        return x.astype(np.float32, copy=False)

    def inpaint(self, image: np.ndarray, keep: np.ndarray, count: int = 1, label: Optional[int] = None, *,
                sampler: Optional[str] = None, steps: Optional[int] = None, eta: Optional[float] = None,
                guidance: Optional[float] = None, jump_length: int = 1, jump_n_sample: int = 1, seed: int = 0,
                randn: Optional[Randn] = None, clip: bool = True) -> np.ndarray:
        """`count` completions of one image (C, H, W) in [-1, 1]; returns (count, C, H, W) float32.

        keep (C, H, W) bool: True where the image's pixel stays, False where it is regenerated.
        With a label the completions are of that class (the model's guidance); without one,
        unconditional. jump_length / jump_n_sample: RePaint's resampling (1 / 1: none).
        """
        d = self.defaults
        sampler = sampler or d.get("sampler", "ddim")
        steps = int(steps if steps is not None else d.get("steps", min(50, self.timesteps)))
        eta = float(eta if eta is not None else d.get("eta", 0.0))
        if label is None:  # unconditional: the null class alone
            if guidance is not None:
                raise SamplingRequestError("--guidance: steers towards a --label; give one, or drop --guidance")
            guidance = 0.0
        guidance = float(guidance if guidance is not None else d.get("guidance", 1.0))
        image = np.asarray(image, dtype=np.float32)
        keep = np.asarray(keep, dtype=bool)
        if tuple(image.shape) != self.shape:
            raise diffusion.InpaintInputError(f"{FLAGS['image']}: shape {tuple(image.shape)}, {self.name} takes "
                                              f"{self.shape} (channels, height, width)")
        diffusion.check_inpaint(image.shape, keep, FLAGS)
        y = np.full(count, 0 if label is None else label, dtype=np.int64)
        timesteps = self.check(y, sampler, steps, eta, guidance)
        diffusion.repaint_schedule(len(timesteps), jump_length, jump_n_sample, FLAGS)
        randn = randn or numpy_randn(seed)

        def noise(shape: tuple) -> np.ndarray:
            return np.asarray(randn(shape), dtype=np.float32)

        known = np.broadcast_to(image, (count, *self.shape))
        x = diffusion.inpaint_loop(noise((count, *self.shape)), known, np.broadcast_to(keep, known.shape),
                                   lambda x, t: self.eps(x, t, y, guidance), noise, timesteps,
                                   self.alphas_cumprod, sampler, eta, clip, jump_length, jump_n_sample)
        return x.astype(np.float32, copy=False)

    def from_levels(self, levels: np.ndarray) -> np.ndarray:
        """Integer grey levels 0..levels-1 -> [-1, 1] float32, as training reads the data."""
        top = int(self.config.get("levels", 256)) - 1
        return (np.asarray(levels, dtype=np.float32) / top * 2 - 1).astype(np.float32)

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
            raise SamplingRequestError(f"--count: must be at least 1, got {count}")
        try:
            start = self.tokenizer.encode(prompt, strict=True)
        except ValueError as e:  # UnknownCharactersError
            raise SamplingRequestError(f"--prompt: {e}") from None
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
        check_temperature(temperature, FLAGS)
        check_top_k(top_k, self.vocab_size, FLAGS)
        check_length(max_new_tokens, FLAGS)
        if prompt_len < 1:
            raise SamplingRequestError("--prompt: empty; give at least one token to start from")
        if prompt_len > self.block_size:
            raise SamplingRequestError(f"--prompt: {prompt_len} tokens, longer than the model's context "
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
                      top_k: Optional[int] = None, seed: int = 0, prefix: Optional[np.ndarray] = None) -> np.ndarray:
        """One image per label: [class token] then the image's tokens (components.tokenizer.image_tokens:
        image_size^2 pixels in raster order, a colour pixel's C channel values consecutive); returns
        levels (B, C, H, W) uint8, C = 1 for grey (the layout of the graphs and the diffusion engine).

        prefix: the first P pixels in raster order, kept as given: levels (P,) grey, (P, C) or their P*C
        tokens (P*C,) colour; the model writes the rest (a completion of the image's top).
        """
        from components.tokenizer import image_token_count, tokens_to_nchw

        c, d = self.config, self.defaults
        if self.kind != "image":
            raise InferenceError(f"{self.name}: a text model; it does not draw images")
        num_classes, levels, size = int(c["num_classes"]), int(c["levels"]), int(c["image_size"])
        channels = int(c.get("channels", 1))
        D = image_token_count(size, channels)
        class_offset, pixel_offset = int(c["class_token_offset"]), int(c.get("pixel_token_offset", 0))
        temperature = float(temperature if temperature is not None else d.get("temperature", 1.0))
        top_k = int(top_k if top_k is not None else d.get("top_k", 0))
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
        check_labels(y, num_classes, FLAGS, self.name)
        check_top_k(top_k, levels, FLAGS, f"the {levels} grey levels")  # sampling runs over the grey levels only
        allowed = np.zeros(self.vocab_size, dtype=bool)  # pixels only: a class token is never a pixel
        allowed[pixel_offset:pixel_offset + levels] = True
        start = (class_offset + y)[:, None]                                        # (B, 1)
        if prefix is not None and len(prefix):
            prefix = np.asarray(prefix, dtype=np.int64).reshape(-1)
            if channels == 1 and (len(prefix) >= D or prefix.min() < 0 or prefix.max() >= levels):
                raise SamplingRequestError(f"prefix: 1..{size * size - 1} grey levels in 0..{levels - 1} expected")
            if channels > 1 and (len(prefix) >= D or len(prefix) % channels or prefix.min() < 0
                                 or prefix.max() >= levels):
                raise SamplingRequestError(f"prefix: 1..{size * size - 1} pixels of {channels} levels in "
                                           f"0..{levels - 1} expected (all channels of a kept pixel)")
            start = np.concatenate([start, np.tile(pixel_offset + prefix, (len(y), 1))], axis=1)
        ids = self.generate(start, D + 1 - start.shape[1], temperature, top_k, seed=seed, allowed=allowed)
        tokens = ids[:, 1:] - pixel_offset                                         # (B, H*W*C) in 0..levels-1
        return tokens_to_nchw(tokens, size, channels).astype(np.uint8)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of a pixel model's images, as sample_digits returns them."""
        size = int(self.config["image_size"])
        return (int(self.config.get("channels", 1)), size, size)

    def complete_image(self, image: np.ndarray, keep: np.ndarray, labels: Sequence[int], **kw: Any) -> np.ndarray:
        """Completions of one image, levels (C, H, W), whose keep mask (H, W) or (C, H, W) (True: kept)
        holds the first P pixels in raster order; a kept pixel keeps all its channels. One per label:
        levels (B, C, H, W). A mask that keeps a later pixel, or one channel of a pixel but not the
        others, is refused in one line (a raster-order model cannot condition on later values)."""
        shape = self.image_shape
        image, keep = np.asarray(image), np.asarray(keep, dtype=bool)
        if image.shape != shape:
            raise SamplingRequestError(f"{FLAGS['image']}: shape {image.shape}, {self.name} takes {shape} "
                                       "(channels, height, width)")
        if keep.shape == shape:
            if not (keep == keep[:1]).all():
                raise SamplingRequestError(f"{FLAGS['mask']}: keeps some channels of a pixel but not "
                                           "the others; a pixel is kept or regenerated whole")
            keep = keep[0]
        if keep.shape != shape[1:]:
            raise SamplingRequestError(f"{FLAGS['mask']}: shape {keep.shape}, expected {shape[1:]}")
        flat = keep.reshape(-1)
        p = int(flat.sum())
        if not (0 < p < flat.size and flat[:p].all()):
            raise SamplingRequestError(f"{FLAGS['mask']}: {self.name} writes pixels in raster order "
                                       "and completes only a mask that regenerates every pixel after the first "
                                       "ones (e.g. the bottom rows)")
        prefix = image.transpose(1, 2, 0).reshape(-1, shape[0])[:p]                # (P, C): whole pixels
        return self.sample_digits(labels, prefix=prefix, **kw)

    def sample_images(self, labels: Sequence[int], **kw: Any) -> np.ndarray:
        """sample_digits as images: (B, H, W) float32 in [0, 1] grey, (B, H, W, C) colour (channels last)."""
        return nchw_to_images(self.sample_digits(labels, **kw), int(self.config["levels"]))


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
        masked.check_request(prompt_len, length, steps, temperature, top_k, self.mask_id, self.block_size, FLAGS)

    def generate(self, prompt: np.ndarray, batch: int, length: int, steps: int, temperature: float = 1.0,
                 top_k: int = 0, *, seed: int = 0, rand: Optional[Callable[[tuple], np.ndarray]] = None) -> np.ndarray:
        """`batch` sequences: the prompt ids (P,) then `length` ids written in K = steps steps; (B, P + length).

        `prompt` may also be (B, P): one prompt per row, all of one length. Same as
        MaskedDiffusion.sample: per step, position scores (B, P + length) then token uniforms
        (B, n) from rand(shape) (default: numpy's generator seeded with `seed`).
        """
        prompt = np.asarray(prompt, dtype=np.int64)
        prompts = prompt.reshape(1, -1).repeat(batch, axis=0) if prompt.ndim < 2 else prompt
        if prompts.shape[0] != batch:
            raise InferenceError(f"prompts: {prompts.shape[0]} rows for a batch of {batch}")
        self.check_sampling(prompts.shape[1], length, steps, temperature, top_k or 0)
        if rand is None:
            rng = np.random.default_rng(seed)
            rand = rng.random
        x = np.concatenate([prompts, np.full((batch, length), self.mask_id, dtype=np.int64)], axis=1)  # (B, P + L)
        rows = np.arange(batch)[:, None]
        for n in masked.unmask_counts(length, steps):
            if n == 0:
                continue
            logits = self.logits(x)                                                # (B, P + L, V - 1)
            scores = np.where(x == self.mask_id, rand(x.shape), 2.0)
            chosen = np.argsort(scores, axis=1, kind="stable")[:, :n]              # (B, n) random masked positions
            tokens = masked.draw_tokens(logits[rows, chosen], np.asarray(rand((batch, n))), temperature, top_k or 0)
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
