"""What a generate request may ask of one engine, and running it: request bodies in, images or texts out.

    job = plan(engine, body, Limits(max_n=16, max_length=512))   # RequestProblem (-> 422) if bad
    out = run_jobs(engine, [job])                                # [["<base64 PNG>", ...]] or [["text", ...]]

Images: ``{"n", "label", "steps", "guidance", "seed"}`` (a pixel GPT takes temperature and top_k
instead of steps and guidance); a diffusion model also takes ``"inpaint": {"image", "mask", "jump",
"resample", "resize"}`` (n completions of the image, as `genflow sample --inpaint` draws them,
never batched with others); text: ``{"prompt", "length", "temperature", "top_k", "seed", "n"}``
(a masked LM also takes ``steps``: its K); a text-to-image model: ``{"prompt", "n", "steps", "guidance",
"seed"}``, n images of the caption; a super-resolution model: ``{"upscale", "n", "steps", "seed"}``,
n upscalings of one low-res image (a base64 PNG or rows of grey levels, as `genflow sample --upscale`
reads a file; never batched with others). Omitted settings take the model's sample defaults,
as in `genflow sample`; the same seed and version give what `genflow sample` gives (label given:
``genflow sample --label L -n N --seed S``). Without a label, image i gets class i mod classes.

Diffusion jobs with the same steps and guidance run as one batch, and so do causal text jobs
whose prompts have the same length and whose length, temperature and top_k agree (each request
keeps its own random stream, so a batched output equals the one drawn alone up to float rounding).
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from components.errors import ConfigError, ModelError
from components.inference import (
    CausalLMEngine,
    DiffusionEngine,
    EncDecEngine,
    Engine,
    InferenceError,
    MaskedLMEngine,
    Randn,
    SuperResEngine,
    TextDiffusionEngine,
    numpy_randn,
)
from components.sampling.requests import FLAGS

MAX_SEED = 2 ** 63 - 1
MAX_MASKED_STEPS = 10_000  # K above the length only adds empty steps; bounded all the same
MAX_RESAMPLE = 20          # RePaint's resampling multiplies the network calls: bounded per request
# how the inpainting checks (components/sampling/) name a request's fields
INPAINT_NAMES = {**FLAGS, "image": "inpaint.image", "mask": "inpaint.mask", "jump": "inpaint.jump",
                 "resample": "inpaint.resample", "resize": '"resize": true', "steps": "steps",
                 "guidance": "guidance", "label": "label"}


class RequestProblem(ConfigError):
    """A request the model cannot serve: answered 422 with the field, the problem and the allowed range."""

    def __init__(self, field_name: str, problem: str, allowed: Optional[str] = None, got: Any = None,
                 more: Optional[list[dict]] = None):
        super().__init__(f"{field_name}: {problem}" + (f" (allowed: {allowed})" if allowed else ""))
        self.detail = [{"field": field_name, "problem": problem, "allowed": allowed, "got": got}] + (more or [])


@dataclass(frozen=True)
class Limits:
    """Largest requests the server accepts (flags of `genflow serve`)."""

    max_n: int = 16
    max_length: int = 512


class InpaintInput(BaseModel):
    """The `inpaint` field of an image request: complete this image where the mask says (diffusion models)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    image: Any = Field(..., description="a base64 PNG (read as `genflow sample --inpaint` reads a file), or H rows "
                                        "of W grey levels 0..levels-1")
    mask: Any = Field(..., description="a base64 PNG (white: regenerate, black: keep), or H rows of W values "
                                       "(1: regenerate, 0: keep)")
    jump: Optional[int] = Field(None, ge=1, description="RePaint: go back this many steps when resampling")
    resample: Optional[int] = Field(None, ge=1, le=MAX_RESAMPLE, description="RePaint: denoise each jump R times")
    resize: bool = Field(False, description="crop and resize a PNG of another size to the model's")


class ImageRequest(BaseModel):
    """POST body for an image model."""

    model_config = ConfigDict(extra="forbid", strict=True)
    inpaint: Optional[InpaintInput] = Field(None, description="diffusion models: n completions of this image")
    n: int = Field(1, ge=1, description="images to draw (at most --max-n)")
    label: Optional[int] = Field(None, ge=0, description="class of every image (default: i mod classes)")
    steps: Optional[int] = Field(None, ge=1, description="diffusion sampling steps, 1..T")
    guidance: Optional[float] = Field(None, ge=0, description="classifier-free guidance scale")
    temperature: Optional[float] = Field(None, gt=0, description="pixel GPT only")
    top_k: Optional[int] = Field(None, ge=0, description="pixel GPT only")
    seed: int = Field(0, ge=0, le=MAX_SEED)


class TextRequest(BaseModel):
    """POST body for a text model."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: Optional[str] = Field(None, max_length=100_000, description="text to continue")
    n: int = Field(1, ge=1, description="texts to write (at most --max-n)")
    length: Optional[int] = Field(None, ge=1, description="characters to generate (at most --max-length)")
    temperature: Optional[float] = Field(None, gt=0)
    top_k: Optional[int] = Field(None, ge=0)
    steps: Optional[int] = Field(None, ge=1, description="masked LM only: K, its number of denoising steps")
    seed: int = Field(0, ge=0, le=MAX_SEED)


class SourceRequest(BaseModel):
    """POST body for an encoder-decoder: the source to transduce."""

    model_config = ConfigDict(extra="forbid", strict=True)
    source: str = Field(..., min_length=1, max_length=100_000, description="text to transduce")
    n: int = Field(1, ge=1, description="targets to write (at most --max-n; several are drawn)")
    decoding: Optional[str] = Field(None, pattern="^(greedy|sample|beam)$", description="greedy, sample or beam")
    beam_width: Optional[int] = Field(None, ge=1, description="beam search only")
    temperature: Optional[float] = Field(None, gt=0)
    top_k: Optional[int] = Field(None, ge=0)
    seed: int = Field(0, ge=0, le=MAX_SEED)


class PromptImageRequest(BaseModel):
    """POST body for a text-to-image model: n images of one caption."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(..., max_length=100_000, description="the caption to draw")
    n: int = Field(1, ge=1, description="images to draw (at most --max-n)")
    steps: Optional[int] = Field(None, ge=1, description="diffusion sampling steps, 1..T")
    guidance: Optional[float] = Field(None, ge=0, description="classifier-free guidance scale")
    seed: int = Field(0, ge=0, le=MAX_SEED)


class UpscaleRequest(BaseModel):
    """POST body for a super-resolution model: n upscalings of one low-res image."""

    model_config = ConfigDict(extra="forbid", strict=True)
    upscale: Any = Field(..., description="the low-res image: a base64 PNG (read as `genflow sample --upscale` "
                                          "reads a file), or H/f rows of W/f grey levels 0..levels-1")
    n: int = Field(1, ge=1, description="upscalings to draw (at most --max-n)")
    steps: Optional[int] = Field(None, ge=1, description="diffusion sampling steps, 1..T")
    seed: int = Field(0, ge=0, le=MAX_SEED)


def _plan_upscale(engine: SuperResEngine, req: UpscaleRequest, allowed: dict) -> Job:
    """n upscalings of the request's low-res image, checked as `genflow sample --upscale` checks its file."""
    from components.sampling.superres import SuperResInputError, read_upscale_input, upscale_levels

    levels = int(engine.config.get("levels", 256))
    steps = req.steps if req.steps is not None else int(engine.defaults.get("steps", min(50, engine.timesteps)))
    _in_range("steps", steps, 1, engine.timesteps, allowed)
    try:
        if isinstance(req.upscale, str):
            lowres = read_upscale_input(_png_bytes(req.upscale, "upscale"), engine.shape, engine.factor, levels,
                                        model=engine.name, flag="upscale", resize_flag=None)
        elif isinstance(req.upscale, list):
            lowres = upscale_levels(req.upscale, engine.shape, engine.factor, levels, engine.name, flag="upscale")
        else:
            raise RequestProblem("upscale", "expected a base64 PNG string or rows of integers", allowed["upscale"])
    except SuperResInputError as e:
        raise RequestProblem("upscale", str(e).partition(": ")[2] or str(e), allowed["upscale"]) from None
    return Job("images", {"lowres": lowres, "steps": steps, "seed": req.seed}, n=req.n, extra={"upscale": True})


class PromptPixelsRequest(BaseModel):
    """POST body for a prompt-to-pixels encoder-decoder (captions-encdec): n images of one caption."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(..., max_length=100_000, description="the caption to draw")
    n: int = Field(1, ge=1, description="images to draw (at most --max-n)")
    temperature: Optional[float] = Field(None, gt=0)
    top_k: Optional[int] = Field(None, ge=0)
    seed: int = Field(0, ge=0, le=MAX_SEED)


def prompts_pixels(engine: Engine) -> bool:
    """An encoder-decoder that writes pixels from a prompt (captions-encdec), not text from a source."""
    return isinstance(engine, EncDecEngine) and engine.prompts is not None


def _plan_prompted(engine: TextDiffusionEngine, req: PromptImageRequest, allowed: dict) -> Job:
    try:
        engine.tokenizer.encode_prompt(req.prompt, required=True)   # empty, unknown characters, too long
    except ModelError as e:
        raise RequestProblem("prompt", str(e).partition(": ")[2] or str(e), allowed["prompt"], None) from None
    d = engine.defaults
    steps = req.steps if req.steps is not None else int(d.get("steps", min(50, engine.timesteps)))
    guidance = req.guidance if req.guidance is not None else float(d.get("guidance", 1.0))
    _in_range("steps", steps, 1, engine.timesteps, allowed)
    return Job("images", {"prompts": [req.prompt] * req.n, "steps": steps, "guidance": guidance, "seed": req.seed},
               batch_key=("prompted", steps, guidance), n=req.n)


def _run_prompted(engine: TextDiffusionEngine, jobs: list["Job"]) -> list[list[str]]:
    """Prompt jobs with the same steps and guidance in one batch, each request's noise its own stream."""
    s = jobs[0].settings
    prompts = [p for j in jobs for p in j.settings["prompts"]]
    x = engine.sample_prompts(prompts, steps=s["steps"], guidance=s["guidance"], randn=_noise(jobs))
    return _images_per_job(engine, x, jobs)


def _noise(jobs: list["Job"]):
    """One noise stream per request (its seed), so a batched request gets what it gets alone."""
    if len(jobs) == 1:
        return numpy_randn(jobs[0].settings["seed"])
    return batched_randn([(j.settings["seed"], j.n) for j in jobs])


def _images_per_job(engine: DiffusionEngine, x, jobs: list["Job"]) -> list[list[str]]:
    """The batch's images as PNGs (base64), split back into each job's n."""
    images = [png_base64(v, int(engine.config.get("levels", 256))) for v in engine.to_levels(x)]
    out, at = [], 0
    for j in jobs:
        out.append(images[at:at + j.n])
        at += j.n
    return out


@dataclass
class Job:
    """One checked request: what to run and the key of the batch it may share (None: runs alone)."""

    kind: str                       # "images" | "texts" | "targets" (an encoder-decoder's, answered as texts)
    settings: dict
    batch_key: Optional[tuple] = None
    n: int = 1
    extra: dict = field(default_factory=dict)


def is_image(engine: Engine) -> bool:
    return engine.kind == "image"


def allowed_ranges(engine: Engine, limits: Limits) -> dict[str, str]:
    """Allowed values of each request field for this engine (the 422 body quotes them)."""
    out = {"n": f"1..{limits.max_n}", "seed": f"0..{MAX_SEED}"}
    if isinstance(engine, TextDiffusionEngine):
        out.update(prompt=f"1..{engine.tokenizer.max_chars} characters of the model's captions",
                   steps=f"1..{engine.timesteps}", guidance=">= 0")
    elif isinstance(engine, SuperResEngine):
        c, h, w = engine.lowres_shape
        top = int(engine.config.get("levels", 256)) - 1
        out.update(upscale=f"a {w}x{h} base64 PNG, or {h} rows of {w} grey levels 0..{top}" if c == 1 else
                   f"a {w}x{h} base64 RGB PNG", steps=f"1..{engine.timesteps}")
    elif prompts_pixels(engine):
        out.update(prompt=f"1..{engine.prompts.max_chars} characters of the model's captions", temperature="> 0",
                   top_k=f"0..{int(engine.config['levels'])}")
    elif isinstance(engine, EncDecEngine):
        out.update(source=f"1..{engine.source_len} characters of the model's vocabulary",
                   decoding="greedy | sample | beam", beam_width=">= 1", temperature="> 0", top_k=">= 0")
    elif isinstance(engine, DiffusionEngine):
        out.update(label=f"0..{engine.num_classes - 1}", steps=f"1..{engine.timesteps}", guidance=">= 0")
    elif is_image(engine):
        levels = int(engine.config["levels"])
        out.update(label=f"0..{int(engine.config['num_classes']) - 1}", temperature="> 0", top_k=f"0..{levels}")
    else:
        top = engine.mask_id if isinstance(engine, MaskedLMEngine) else engine.vocab_size
        out.update(length=f"1..{limits.max_length}", temperature="> 0", top_k=f"0..{top}",
                   prompt=f"at most {engine.block_size} characters of the model's vocabulary")
        if isinstance(engine, MaskedLMEngine):
            out.update(steps=f"1..{MAX_MASKED_STEPS}", length=f"1..{min(limits.max_length, engine.block_size)} "
                                                 "(prompt + length <= block_size)")
    return out


def request_schema(engine: Engine) -> type[BaseModel]:
    if isinstance(engine, TextDiffusionEngine):
        return PromptImageRequest
    if isinstance(engine, SuperResEngine):
        return UpscaleRequest
    if prompts_pixels(engine):
        return PromptPixelsRequest
    if isinstance(engine, EncDecEngine):
        return SourceRequest
    return ImageRequest if is_image(engine) else TextRequest


def _not_for(engine: Engine, names: tuple[str, ...], req: BaseModel, allowed: dict) -> None:
    for name in names:
        if getattr(req, name) is not None:
            kind = f"{engine.config.get('family', engine.graph)} {engine.kind} model"
            raise RequestProblem(name, f"{engine.name} is a {kind} and has no such setting; drop it",
                                 ", ".join(sorted(allowed)), getattr(req, name))


def _in_range(name: str, value: Optional[int], low: int, high: int, allowed: dict) -> None:
    if value is not None and not low <= value <= high:
        raise RequestProblem(name, f"{value} is outside {low}..{high}", allowed[name], value)


def plan(engine: Engine, body: Any, limits: Limits) -> Job:
    """Check a request body against the engine and the server's limits; RequestProblem names the field."""
    allowed = allowed_ranges(engine, limits)
    schema = request_schema(engine)
    if not isinstance(body, dict):
        raise RequestProblem("body", f"expected a JSON object, got {type(body).__name__}",
                             f"an object with fields {', '.join(schema.model_fields)}")
    try:
        req = schema.model_validate(body)
    except ValidationError as e:
        details = []
        for err in e.errors():
            name = ".".join(str(p) for p in err["loc"]) or "body"
            hint = allowed.get(name) or (f"fields: {', '.join(schema.model_fields)}"
                                         if err["type"] == "extra_forbidden" else None)
            got = err.get("input")
            details.append({"field": name, "problem": err["msg"], "allowed": hint,
                            "got": got if isinstance(got, (int, float, str, bool, type(None))) else None})
        first = details[0]
        raise RequestProblem(first["field"], first["problem"], first["allowed"], first["got"], details[1:]) from None
    _in_range("n", req.n, 1, limits.max_n, allowed)
    if isinstance(engine, TextDiffusionEngine):
        return _plan_prompted(engine, req, allowed)
    if isinstance(engine, SuperResEngine):
        return _plan_upscale(engine, req, allowed)
    if prompts_pixels(engine):
        try:
            engine.prompts.encode_prompt(req.prompt, required=True)   # empty, unknown characters, too long
        except ModelError as e:
            raise RequestProblem("prompt", str(e).partition(": ")[2] or str(e), allowed["prompt"], None) from None
        _in_range("top_k", req.top_k, 0, int(engine.config["levels"]), allowed)
        return Job("pixels", {"prompts": [req.prompt] * req.n, "temperature": req.temperature, "top_k": req.top_k,
                              "seed": req.seed}, n=req.n)
    if isinstance(engine, EncDecEngine):
        try:
            engine.source_ids(req.source)   # the vocabulary and the encoder's context
        except InferenceError as e:
            raise RequestProblem("source", str(e).partition(": ")[2] or str(e), allowed["source"], None) from None
        decoding = req.decoding or ("sample" if req.n > 1 else None)   # several targets of one source: drawn
        return Job("targets", {"source": req.source, "decoding": decoding, "beam_width": req.beam_width,
                               "temperature": req.temperature, "top_k": req.top_k, "seed": req.seed}, n=req.n)
    if isinstance(engine, DiffusionEngine):
        _not_for(engine, ("temperature", "top_k"), req, allowed)
        _in_range("label", req.label, 0, engine.num_classes - 1, allowed)
        d = engine.defaults
        steps = req.steps if req.steps is not None else int(d.get("steps", min(50, engine.timesteps)))
        guidance = req.guidance if req.guidance is not None else float(d.get("guidance", 1.0))
        _in_range("steps", steps, 1, engine.timesteps, allowed)
        if req.inpaint is not None:
            return _plan_inpaint(engine, req, steps, allowed)
        labels = ([req.label] * req.n if req.label is not None
                  else [i % engine.num_classes for i in range(req.n)])
        return Job("images", {"labels": labels, "steps": steps, "guidance": guidance, "seed": req.seed},
                   batch_key=("diffusion", steps, guidance), n=req.n)
    if is_image(engine):  # a GPT over the pixels
        _not_for(engine, ("steps", "guidance"), req, allowed)
        if req.inpaint is not None:
            raise RequestProblem("inpaint", f"{engine.name} is an autoregressive model: over HTTP only diffusion "
                                 "models inpaint (genflow sample --inpaint completes the bottom rows with it)",
                                 "a diffusion model's name", None)
        classes = int(engine.config["num_classes"])
        _in_range("label", req.label, 0, classes - 1, allowed)
        _in_range("top_k", req.top_k, 0, int(engine.config["levels"]), allowed)
        labels = [req.label] * req.n if req.label is not None else [i % classes for i in range(req.n)]
        return Job("images", {"labels": labels, "temperature": req.temperature, "top_k": req.top_k,
                              "seed": req.seed}, n=req.n)
    return _plan_text(engine, req, limits, allowed)


def _png_bytes(value: str, name: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise RequestProblem(name, "not valid base64", "a base64 PNG, or rows of integers", None) from None


def _plan_inpaint(engine: DiffusionEngine, req: ImageRequest, steps: int, allowed: dict) -> Job:
    """n RePaint completions of the request's image, checked as `genflow sample --inpaint` checks its files."""
    from components.sampling.diffusion import InpaintInputError, repaint_schedule, sampling_timesteps
    from components.sampling.inpaint import inpaint_levels, read_inpaint_inputs

    inp = req.inpaint
    if req.label is None and req.guidance is not None:
        raise RequestProblem("guidance", "steers towards a label; give one, or drop guidance (no label: the "
                             "completion is unconditional)", allowed["guidance"], req.guidance)
    if inp.jump is not None and inp.resample is None:
        raise RequestProblem("inpaint.jump", "sets how far each resampling goes back; give inpaint.resample R > 1 "
                             "with it", ">= 1", inp.jump)
    form = "a base64 PNG string each, or rows of integers each"
    levels = int(engine.config.get("levels", 256))
    try:
        if isinstance(inp.image, str) and isinstance(inp.mask, str):
            pixels, keep = read_inpaint_inputs(_png_bytes(inp.image, "inpaint.image"),
                                               _png_bytes(inp.mask, "inpaint.mask"), engine.shape, levels,
                                               inp.resize, INPAINT_NAMES)
        elif isinstance(inp.image, list) and isinstance(inp.mask, list):
            if inp.resize:
                raise RequestProblem("inpaint.resize", "only for PNG inputs; send rows of the model's size", form)
            pixels, keep = inpaint_levels(inp.image, inp.mask, engine.shape, levels, INPAINT_NAMES)
        else:
            raise RequestProblem("inpaint", "image and mask must be of one form", form, None)
        repaint_schedule(len(sampling_timesteps(engine.timesteps, steps)), inp.jump or 1, inp.resample or 1,
                         INPAINT_NAMES)
    except InpaintInputError as e:
        name, _, problem = str(e).partition(": ")
        raise RequestProblem(name if name.startswith("inpaint.") else "inpaint", problem or str(e), form) from None
    return Job("images", {"image": pixels, "keep": keep, "label": req.label, "steps": steps,
                          "guidance": req.guidance, "jump": inp.jump or 1, "resample": inp.resample or 1,
                          "seed": req.seed}, n=req.n, extra={"inpaint": True})


def _plan_text(engine: Engine, req: TextRequest, limits: Limits, allowed: dict) -> Job:
    masked = isinstance(engine, MaskedLMEngine)
    if not masked:
        _not_for(engine, ("steps",), req, allowed)
    _in_range("length", req.length, 1, limits.max_length, allowed)
    _in_range("top_k", req.top_k, 0, engine.mask_id if masked else engine.vocab_size, allowed)
    prompt = req.prompt if req.prompt is not None else engine.defaults.get("prompt", "")
    try:
        ids = engine.tokenizer.encode(prompt, strict=True)
    except ValueError as e:
        raise RequestProblem("prompt", str(e), allowed["prompt"], None) from None
    if len(ids) > engine.block_size:
        raise RequestProblem("prompt", f"{len(ids)} characters, longer than the model's context "
                             f"({engine.block_size})", allowed["prompt"], len(ids))
    length = req.length if req.length is not None else int(engine.defaults.get("length", engine.block_size
                                                                                 if masked else 256))
    length = min(length, limits.max_length) if req.length is None else length
    if masked:
        if len(ids) + length > engine.block_size:
            raise RequestProblem("length", f"the prompt ({len(ids)}) plus {length} characters exceed the "
                                 f"model's block_size={engine.block_size}", allowed["length"], length)
        steps = req.steps if req.steps is not None else int(engine.defaults.get("steps", 32))
        _in_range("steps", steps, 1, MAX_MASKED_STEPS, allowed)
    settings = {"prompt": req.prompt, "length": length, "temperature": req.temperature, "top_k": req.top_k,
                "seed": req.seed, "count": req.n}
    # What sample_text decodes from, resolved here so that requests whose prompts have the same
    # length (and the same sampling settings) can share one batch.
    start, length, temperature, top_k = engine.text_request(req.prompt, length, req.temperature, req.top_k,
                                                            req.n, engine.block_size if masked else 256)
    if masked:
        settings["steps"] = steps
        return Job("texts", settings, batch_key=("masked", len(start), length, steps, temperature, top_k),
                   n=req.n, extra={"start": np.asarray(start, dtype=np.int64)})
    lead = 0
    if len(start) == 0:  # no prompt: start from a document break, as sample_text does
        tok = engine.tokenizer
        start, lead = tok.encode("\n" if "\n" in tok.stoi else tok.vocab[0]), 1
    return Job("texts", settings, batch_key=("causal", len(start), length, temperature, top_k), n=req.n,
               extra={"start": np.asarray(start, dtype=np.int64), "lead": lead})


# ---------------------------------------------------------------------------
# Running checked jobs
# ---------------------------------------------------------------------------

def batched_randn(parts: list[tuple[int, int]]) -> Randn:
    """Noise for a batch of requests [(seed, n), ...]: each request's rows come from its own stream,
    drawn exactly as numpy_randn(seed) draws them for that request alone."""
    rngs = [(np.random.default_rng(seed), n) for seed, n in parts]
    return lambda shape: np.concatenate([rng.standard_normal((n, *shape[1:]), dtype=np.float32)
                                         for rng, n in rngs])


class RowStreams:
    """Stands in for the np.random.Generator of CausalLMEngine.generate (its .random, for
    MaskedLMEngine.generate) in a batch of requests
    [(seed, n), ...]: each request's rows are drawn from its own stream, as they are alone."""

    def __init__(self, parts: list[tuple[int, int]]):
        self.parts = [(np.random.default_rng(seed), n) for seed, n in parts]

    def random(self, shape: tuple) -> np.ndarray:
        return np.concatenate([rng.random((n, *shape[1:])) for rng, n in self.parts])


def run_causal_batch(engine: CausalLMEngine, jobs: list[Job]) -> list[list[str]]:
    """Text requests with the same prompt length and settings in one decoding batch."""
    _, _, length, temperature, top_k = jobs[0].batch_key
    ids = np.concatenate([np.tile(j.extra["start"], (j.n, 1)) for j in jobs])           # (B, T)
    out = engine.generate(ids, length, temperature, top_k,
                          rng=RowStreams([(j.settings["seed"], j.n) for j in jobs]))   # (B, T + length)
    texts, at = [], 0
    for j in jobs:
        texts.append([engine.tokenizer.decode(row[j.extra["lead"]:]) for row in out[at:at + j.n]])
        at += j.n
    return texts


def run_masked_batch(engine: MaskedLMEngine, jobs: list[Job]) -> list[list[str]]:
    """Masked-LM requests with the same prompt length, length, K and sampling settings: one
    graph call per denoising step for all of them, each request's draws from its own stream."""
    _, _, length, steps, temperature, top_k = jobs[0].batch_key
    ids = np.concatenate([np.tile(j.extra["start"], (j.n, 1)) for j in jobs])           # (B, P)
    out = engine.generate(ids, len(ids), length, steps, temperature, top_k,
                          rand=RowStreams([(j.settings["seed"], j.n) for j in jobs]).random)
    texts, at = [], 0
    for j in jobs:
        texts.append([engine.tokenizer.decode(row) for row in out[at:at + j.n]])
        at += j.n
    return texts


def png_base64(levels: np.ndarray, n_levels: int) -> str:
    """(1, H, W) grey levels 0..n_levels-1 -> a base64 PNG, 0 black, the top level white; (3, H, W)
    colour levels -> an RGB PNG, each channel scaled the same way. Every image engine's (C, H, W)
    levels go through it: the diffusion models', the pixel GPT's and the prompt-to-pixels encdec's."""
    from PIL import Image

    colour = levels.shape[0] == 3
    pixels = np.moveaxis(levels, 0, -1) if colour else levels[0]                  # (H, W, 3) or (H, W)
    grey = (pixels.astype(np.float64) * (255.0 / max(n_levels - 1, 1))).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey, mode="RGB" if colour else "L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def run_jobs(engine: Engine, jobs: list[Job]) -> list[list[str]]:
    """Run jobs that share a batch key (or one job) on the engine; one list of outputs per job.

    An InferenceError of the engine (a request it refuses) is raised as RequestProblem.
    """
    try:
        if isinstance(engine, TextDiffusionEngine):
            return _run_prompted(engine, jobs)
        if isinstance(engine, SuperResEngine):   # never batched: as `genflow sample --upscale -n N --seed S`
            s, n = jobs[0].settings, jobs[0].n
            x = engine.upscale(engine.from_levels(s["lowres"]), n, steps=s["steps"], seed=s["seed"])
            return [[png_base64(v, int(engine.config.get("levels", 256))) for v in engine.to_levels(x)]]
        if isinstance(engine, DiffusionEngine) and jobs[0].extra.get("inpaint"):   # never batched
            s, n = jobs[0].settings, jobs[0].n
            x = engine.inpaint(engine.from_levels(s["image"]), s["keep"], n, s["label"], steps=s["steps"],
                               guidance=s["guidance"], jump_length=s["jump"], jump_n_sample=s["resample"],
                               seed=s["seed"])
            return [[png_base64(v, int(engine.config.get("levels", 256))) for v in engine.to_levels(x)]]
        if isinstance(engine, DiffusionEngine):
            s = jobs[0].settings
            labels = np.concatenate([np.asarray(j.settings["labels"], dtype=np.int64) for j in jobs])
            x = engine.sample(labels, steps=s["steps"], guidance=s["guidance"], randn=_noise(jobs))
            return _images_per_job(engine, x, jobs)
        if len(jobs) > 1 and isinstance(engine, CausalLMEngine) and jobs[0].kind == "texts":
            return run_causal_batch(engine, jobs)
        if len(jobs) > 1 and isinstance(engine, MaskedLMEngine):
            return run_masked_batch(engine, jobs)
        if len(jobs) != 1:
            raise ValueError("only diffusion and text requests are batched")
        job = jobs[0]
        s = dict(job.settings)
        if job.kind == "pixels":   # as `genflow sample MODEL --prompt` draws them
            assert isinstance(engine, EncDecEngine)
            levels = engine.sample_prompts(**s)
            return [[png_base64(x, int(engine.config["levels"])) for x in levels]]
        if job.kind == "targets":   # as `genflow sample MODEL --source` writes them: seed + i for the i-th
            assert isinstance(engine, EncDecEngine)
            source, seed = s.pop("source"), s.pop("seed")
            return [[engine.transduce([source], seed=seed + i, **s)[0] for i in range(job.n)]]
        if job.kind == "images":
            assert isinstance(engine, CausalLMEngine)
            levels = engine.sample_digits(s["labels"], temperature=s["temperature"], top_k=s["top_k"], seed=s["seed"])
            return [[png_base64(x, int(engine.config["levels"])) for x in levels]]
        return [engine.sample_text(s.pop("prompt"), **s)]
    except InferenceError as e:
        text = str(e)
        name, _, problem = text.partition(": ")
        raise RequestProblem(name.lstrip("-").replace("-", "_") if problem else "body", problem or text) from None
