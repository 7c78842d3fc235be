"""`genflow sample MODEL[@alias|:version]`: an exported model on onnxruntime, no torch.

The model comes from the MLflow registry (components/registry/resolve.py) or a local folder;
the output is a PNG grid of images or a text file of samples, written atomically (a reader
never sees half a file, a failure leaves none).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from components.errors import ConfigError
from components.files import atomic_file, write_text
from components.inference import (
    CONFIG_FILE,
    CausalLMEngine,
    DiffusionEngine,
    Engine,
    InferenceError,
    MaskedLMEngine,
    SuperResEngine,
    load_engine,
    numpy_randn,
)
from components.inference.encdec import load_encdec_engine
from components.registry.resolve import download_version, parse_model_spec

CHUNK = 256  # images generated per batch by `genflow sample`


def image_grid(levels: np.ndarray, n_levels: int, rows: int, scale: int = 4, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) levels -> one uint8 picture, `rows` rows, each pixel scale x scale, grey gaps
    (the layout of the evaluation's samples.png: 0 is black, the top level white). One channel: a grey
    picture (rows, cols); three: an RGB one (rows, cols, 3), each channel scaled the same way."""
    N, C, H, W = levels.shape
    cols = -(-N // rows)
    if C == 1:
        grey = (levels[:, 0].astype(np.float64) * (255.0 / max(n_levels - 1, 1))).round().astype(np.uint8)  # (N, H, W)
    elif C == 3:   # colour: channels last, as PIL's RGB
        grey = (np.moveaxis(levels, 1, -1).astype(np.float64) * (255.0 / max(n_levels - 1, 1))).round().astype(np.uint8)
    else:
        raise InferenceError(f"images: {C} channels; a PNG holds 1 (grey) or 3 (RGB)")
    grey = grey.repeat(scale, axis=1).repeat(scale, axis=2)                        # (N, sH, sW[, 3])
    h, w = H * scale, W * scale
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, *grey.shape[3:]), 128, dtype=np.uint8)
    for i in range(N):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = grey[i]
    return canvas


def write_png(path: Path, picture: np.ndarray) -> None:
    from PIL import Image

    with atomic_file(path) as tmp:   # (H, W) grey, (H, W, 3) colour
        Image.fromarray(picture, mode="L" if picture.ndim == 2 else "RGB").save(tmp, format="PNG")


# ---------------------------------------------------------------------------
# genflow sample
# ---------------------------------------------------------------------------

def _arg(args: Any, name: str) -> Any:
    return getattr(args, name, None)


def _or(value: Any, default: int) -> int:
    return default if value is None else int(value)


def _refuse_options(args: Any, engine: Engine, names: dict[str, str]) -> None:
    for attr, flag in names.items():
        if _arg(args, attr) is not None:
            raise ConfigError(f"{flag}: {engine.name} is a {engine.config.get('family', engine.graph)} "
                              f"{engine.kind} model and has no such setting; drop it")


def _sample_images(args: Any, engine: Engine, count: Optional[int]) -> tuple[np.ndarray, int, int]:
    """Returns (levels (N,C,H,W), number of levels, grid rows)."""
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


def _sample_prompted(args: Any, engine: Any, count: Optional[int]) -> tuple[np.ndarray, int, int]:
    """-n images (8 by default) of --prompt from a prompt-conditioned model: (levels, grey levels, grid rows)."""
    prompt = _arg(args, "prompt")
    if prompt is None:
        raise ConfigError(f"--prompt: {engine.name} draws images of a caption; give one, e.g. --prompt "
                          "\"a thick, right-slanted seven\"")
    n = count or 8
    if engine.graph == "encoder_decoder":   # pixels written one at a time (captions-encdec)
        _refuse_options(args, engine, {"label": "--label", "length": "--length", "steps": "--steps",
                                       "guidance": "--guidance"})
        x = engine.sample_prompts([prompt] * n, temperature=_arg(args, "temperature"), top_k=_arg(args, "top_k"),
                                  seed=int(_arg(args, "seed") or 0))
        return x, int(engine.config["levels"]), -(-n // 8)
    _refuse_options(args, engine, {"label": "--label", "length": "--length", "temperature": "--temperature",
                                   "top_k": "--top-k"})
    x = engine.sample_prompts([prompt] * n, steps=_arg(args, "steps"), guidance=_arg(args, "guidance"),
                              seed=int(_arg(args, "seed") or 0))
    return engine.to_levels(x), int(engine.config.get("levels", 256)), -(-n // 8)


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


def _inpaint(args: Any, engine: Engine, count: Optional[int]) -> np.ndarray:
    """Completions of --inpaint IMAGE where --mask is white: grey levels (N, C, H, W)."""
    from components.sampling.inpaint import read_inpaint_inputs

    if isinstance(engine, CausalLMEngine) and engine.kind == "image":
        return _complete_prefix(args, engine, count)
    if not isinstance(engine, DiffusionEngine):
        raise ConfigError(f"--inpaint: {engine.name} is a text model; inpainting takes an image model "
                          "(a denoising diffusion model such as digits-unet)")
    _refuse_options(args, engine, {"prompt": "--prompt", "length": "--length",
                                   "temperature": "--temperature", "top_k": "--top-k"})
    levels, keep = read_inpaint_inputs(Path(args.inpaint), Path(args.mask), engine.shape,
                                       int(engine.config.get("levels", 256)), resize=bool(_arg(args, "resize")))
    x = engine.inpaint(engine.from_levels(levels), keep, count or 4, _arg(args, "label"), steps=_arg(args, "steps"),
                       guidance=_arg(args, "guidance"), jump_length=_or(_arg(args, "jump"), 1),
                       jump_n_sample=_or(_arg(args, "resample"), 1), seed=int(_arg(args, "seed") or 0))
    return engine.to_levels(x)


def _upscale(args: Any, engine: Engine, count: Optional[int]) -> np.ndarray:
    """-n upscalings of the low-res image --upscale IMAGE: grey levels (N, C, H, W)."""
    from components.sampling.superres import read_upscale_input

    if not isinstance(engine, SuperResEngine):
        raise ConfigError(f"--upscale: {engine.name} is not a super-resolution model; use a model with backbone "
                          "unet-sr (e.g. digits-sr)")
    _refuse_options(args, engine, {"label": "--label", "guidance": "--guidance", "prompt": "--prompt",
                                   "length": "--length", "temperature": "--temperature", "top_k": "--top-k"})
    lowres = read_upscale_input(Path(args.upscale), engine.shape, engine.factor, int(engine.config.get("levels", 256)),
                                resize=bool(_arg(args, "resize")), model=engine.name)
    x = engine.upscale(engine.from_levels(lowres), count or 4, steps=_arg(args, "steps"),
                       seed=int(_arg(args, "seed") or 0))
    return engine.to_levels(x)


def _complete_prefix(args: Any, engine: CausalLMEngine, count: Optional[int]) -> np.ndarray:
    """A pixel GPT's --inpaint: only a mask that regenerates every pixel after the first P in raster
    order (the image's bottom) can be honoured (a pixel's every channel); levels (N, C, H, W)."""
    from components.sampling.inpaint import read_inpaint_inputs

    for attr, flag in (("jump", "--jump"), ("resample", "--resample"), ("steps", "--steps"),
                       ("guidance", "--guidance"), ("prompt", "--prompt"), ("length", "--length")):
        if _arg(args, attr) is not None:
            raise ConfigError(f"{flag}: {engine.name} is an autoregressive model and has no such setting; drop it")
    size, n_levels = int(engine.config["image_size"]), int(engine.config["levels"])
    channels = int(engine.config.get("channels", 1))
    levels, keep = read_inpaint_inputs(Path(args.inpaint), Path(args.mask), (channels, size, size), n_levels,
                                       resize=bool(_arg(args, "resize")))
    flat = keep[0].reshape(-1)                                       # per pixel: every channel alike
    first = int(np.argmin(flat))                                     # the first regenerated pixel
    if flat[first:].any():
        raise ConfigError(f"--inpaint: {engine.name} is an autoregressive model: it writes the pixels in raster "
                          "order and cannot condition on later pixels, so it completes only a mask that regenerates "
                          "every pixel after the first ones (e.g. the bottom rows); use a denoising diffusion "
                          "model (e.g. digits-unet) for this mask")
    label = _arg(args, "label")
    if label is None:
        raise ConfigError(f"--label: {engine.name} writes a digit of a given class; give --label")
    return engine.sample_digits(np.full(count or 4, label, dtype=np.int64), temperature=_arg(args, "temperature"),
                                top_k=_arg(args, "top_k"), seed=int(_arg(args, "seed") or 0),
                                prefix=levels.reshape(-1)[:first] if channels == 1 else
                                levels.transpose(1, 2, 0).reshape(-1, channels)[:first])   # (P, C): whole pixels


def sample_cli(args: Any, root: Path) -> Path:
    """`genflow sample MODEL[@alias|:version]`: generate with an exported model; returns the file written.

    The model comes from the MLflow registry (alias default 'champion'), or from DIR/<model>/ with
    --exports DIR. Images: a PNG grid, one row per class with -n images each (or -n images of
    --label). Inpainting (--inpaint IMAGE --mask MASK): -n completions of the image where the mask is
    white, as a grid plus one file per completion (<out>-1.png ...). Super-resolution (--upscale IMAGE):
    -n upscalings of an image of 1/factor the model's size, written the same way. Text: -n samples of
    --length characters after --prompt. Default output:
    reports/samples/<model>-<alias|version|local>[-inpaint|-upscale].png|.txt. Bad input raises a GenflowError (one
    line: ConfigError for an option, SamplingRequestError for a setting out of range,
    RegistryError or InferenceError for the model) before anything is written.
    """
    root = Path(root)
    name, alias, version = parse_model_spec(str(_arg(args, "model") or ""))
    count = _arg(args, "count")
    if count is not None and count < 1:
        raise ConfigError(f"--count: must be at least 1, got {count}")
    for attr, flag in (("steps", "--steps"), ("length", "--length")):
        if _arg(args, attr) is not None and _arg(args, attr) < 1:
            raise ConfigError(f"{flag}: must be at least 1, got {_arg(args, attr)}")
    upscale = _arg(args, "upscale") is not None
    if upscale and (_arg(args, "inpaint") is not None or _arg(args, "mask") is not None):
        raise ConfigError("--upscale IMAGE: one editing mode at a time; drop --inpaint and --mask")
    if (_arg(args, "inpaint") is None) != (_arg(args, "mask") is None):
        raise ConfigError("--inpaint IMAGE and --mask MASK go together (mask: white = regenerate, black = keep)")
    if _arg(args, "inpaint") is None:
        settings = [("jump", "--jump"), ("resample", "--resample")] + ([] if upscale else [("resize", "--resize")])
        for attr, flag in settings:
            if _arg(args, attr) not in (None, False):
                raise ConfigError(f"{flag}: an inpainting setting; use it with --inpaint IMAGE --mask MASK")
    elif _arg(args, "jump") is not None and _arg(args, "resample") is None:
        raise ConfigError("--jump: sets how far each resampling goes back; give --resample R (R > 1) with it")
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
        inpaint = _arg(args, "inpaint") is not None
        edit = "-inpaint" if inpaint else "-upscale" if upscale else ""
        stem = f"{name}-{tag}{edit}"
        out = Path(_arg(args, "out") or root / "reports" / "samples" / f"{stem}.{'png' if image or edit else 'txt'}")
        if not out.is_absolute():
            out = root / out
        want = ".png" if image or edit else ".txt"
        if out.suffix.lower() != want:
            raise ConfigError(f"--out {out}: {name} makes {'images' if image else 'text'}; "
                              f"give a {want} path")
        if edit:
            levels = _inpaint(args, engine, count) if inpaint else _upscale(args, engine, count)
            n_levels = int(engine.config.get("levels", 256))
            write_png(out, image_grid(levels, n_levels, -(-len(levels) // 8)))
            for i, one in enumerate(levels):  # each result at the model's size, as an input would be
                write_png(out.with_name(f"{out.stem}-{i + 1}.png"), image_grid(one[None], n_levels, 1, 1, 0))
        elif engine.graph == "text_denoiser" or (image and engine.graph == "encoder_decoder"):
            levels, n_levels, rows = _sample_prompted(args, engine, count)
            write_png(out, image_grid(levels, n_levels, rows))
        elif image:
            levels, n_levels, rows = _sample_images(args, engine, count)
            write_png(out, image_grid(levels, n_levels, rows))
        else:
            write_text(out, _sample_texts(args, engine, count, f"{name}@{tag}"))
    return out


def sample_source_cli(args: Any, root: Path) -> Path:
    """`genflow sample MODEL[@alias|:version] --source TEXT`: the model's target(s) for one source,
    printed and written to reports/samples/<model>-<alias|version|local>.txt (or --out)."""
    import tempfile

    root = Path(root)
    name, alias, version = parse_model_spec(str(getattr(args, "model", "") or ""))
    count = getattr(args, "count", None) or 1
    if count < 1:
        raise InferenceError(f"--count: must be at least 1, got {count}")
    exports = getattr(args, "exports", None)
    tag = "local" if exports else (alias or version or "champion")
    with tempfile.TemporaryDirectory(prefix="genflow-sample-") as tmp:
        folder = Path(exports) / name if exports else download_version(name, alias, version, root, Path(tmp))
        engine = load_encdec_engine(folder)
        decoding = getattr(args, "decoding", None)
        if count > 1 and decoding is None:
            decoding = "sample"   # several targets of one source: draw them
        targets = [engine.transduce([args.source], decoding=decoding, beam_width=getattr(args, "beam_width", None),
                                    temperature=getattr(args, "temperature", None),
                                    top_k=getattr(args, "top_k", None), seed=int(getattr(args, "seed", 0)) + i)[0]
                   for i in range(count)]
    for t in targets:
        print(t)
    out = Path(getattr(args, "out", None) or root / "reports" / "samples" / f"{name}-{tag}.txt")
    out = out if out.is_absolute() else root / out
    write_text(out, f"source: {args.source}\n" + "".join(f"target: {t}\n" for t in targets))
    return out
