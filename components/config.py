"""params.yaml, read once into typed dataclasses.

Every number a user may change lives in params.yaml; this module is the only
place that reads it. Unknown keys and wrong types are refused with a message
that names the key, e.g. ``models.digits-unet.train.lr: expected float, got 'fast'``.

No heavy imports here: the CLI imports this module to answer ``--help`` quickly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from components.errors import ConfigError


class ParamsError(ConfigError):
    """params.yaml (or a --set override) is not valid; the message names the key."""


# ---------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------

@dataclass
class SplitConfig:
    val: float = 0.1          # share of items (images) or documents (text)
    test: float = 0.2
    seed: int = 0


@dataclass
class ImageValidationConfig:
    min_per_class: int = 20   # every class needs at least this many images
    max_duplicate_share: float = 0.0  # exact train/test duplicates allowed (share of test)


@dataclass
class TextValidationConfig:
    min_chars: int = 10_000   # a corpus smaller than this is refused
    max_vocab: int = 512      # distinct characters allowed


@dataclass
class PairValidationConfig:
    min_pairs: int = 200          # fewer usable pairs than this are refused
    max_source_chars: int = 96    # a longer source (or target) is refused, naming its line
    max_target_chars: int = 120


@dataclass
class CaptionConfig:
    """builtin:digits-captions: how captions are composed from the label and the measured pixels."""
    phrasings: int = 3        # captions per image (the first names every measured property)
    seed: int = 0             # the phrasings of image i are drawn from (seed, i)


@dataclass
class CaptionValidationConfig:
    max_chars: int = 64       # a longer caption is refused, naming its line (the text encoder's context)
    min_images: int = 20      # fewer captioned images than this are refused


@dataclass
class DatasetConfig:
    source: str = ""          # builtin:digits | builtin:pydoc | builtin:pydoc-pairs | builtin:digits-captions |
    #                           imagefolder:PATH | textfile:PATH | pairs:PATH
    # captions: images with text; imagefolder:PATH then holds metadata.jsonl or metadata.csv
    kind: Literal["image", "text", "pairs", "captions"] = "image"
    image_size: int = 8       # images are resized to image_size x image_size
    levels: int = 17          # levels each channel is quantised to (digits: grey 0..16)
    channels: Optional[int] = None   # imagefolder: 3 (RGB) or 1 (grey); none: as the files are (any colour -> 3)
    mixed_modes: Literal["convert", "refuse"] = "convert"   # grey and colour files in one folder
    min_doc_chars: int = 40   # text: documents shorter than this are dropped
    split: SplitConfig = field(default_factory=SplitConfig)
    image_validation: ImageValidationConfig = field(default_factory=ImageValidationConfig)
    text_validation: TextValidationConfig = field(default_factory=TextValidationConfig)
    pair_validation: PairValidationConfig = field(default_factory=PairValidationConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    caption_validation: CaptionValidationConfig = field(default_factory=CaptionValidationConfig)


# ---------------------------------------------------------------------------
# Networks (one dataclass per backbone; the model files re-export them)
# ---------------------------------------------------------------------------

@dataclass
class UNetConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64])  # one entry per resolution
    blocks_per_level: int = 1
    time_dim: int = 128
    groups: int = 8            # GroupNorm groups
    dropout: float = 0.0


@dataclass
class DiTConfig:
    patch_size: int = 2
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0


@dataclass
class GPTConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128      # context length in tokens
    dropout: float = 0.0
    bias: bool = False


@dataclass
class EncDecConfig:
    """The encoder-decoder transformer's shape (components/models/encdec.py)."""
    n_layer_enc: int = 2
    n_layer_dec: int = 2
    n_head: int = 4
    n_embd: int = 128
    source_len: int = 96       # longest source in characters the encoder reads
    target_len: int = 128      # longest target in tokens (characters + the end marker)
    dropout: float = 0.0
    bias: bool = False
    truncate_source: bool = False   # a source longer than source_len: refused (false) or cut (true)


@dataclass
class TextEncoderConfig:
    """The prompt encoder's shape (components/models/textenc.py): characters -> (B, L, D) states."""
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    context: int = 65          # positions: the start token + up to context - 1 prompt characters
    dropout: float = 0.0
    bias: bool = False


@dataclass
class CrossAttentionConfig:
    """Where a prompt-conditioned U-Net attends to the encoded prompt (components/models/unet_text.py)."""
    from_level: int = 1        # cross-attention after every residual block at unet level >= this (0: the
    #                            full resolution; 1: from the first halving down) and in the middle
    heads: int = 4
    pooled: bool = True        # also add the prompt's masked mean to the timestep embedding


@dataclass
class DiffusionConfig:
    timesteps: int = 200
    schedule: Literal["linear", "cosine"] = "cosine"
    p_uncond: float = 0.1      # label dropout for classifier-free guidance


@dataclass
class ConditionConfig:
    """What a conditioned denoiser sees beside the noisy image (backbone unet-sr, components/models/srunet.py)."""
    kind: Literal["lowres"] = "lowres"   # the image at 1/factor of the size (super-resolution, SR3-style)
    factor: int = 2            # the low-res image is image_size / factor pixels a side (2: 8x8 from 4x4)
    upsample: Literal["nearest", "bilinear"] = "bilinear"   # how the network brings it to image_size


@dataclass
class MaskedDiffusionConfig:
    estimator: Literal["count", "time"] = "count"  # how the training loss draws the ELBO (models/mdlm.py)
    eps: float = 1e-3          # "time" estimator: smallest mask time drawn (avoids the 1/t pole at 0)
    conv_kernel: int = 9       # width of the denoiser's local convolution over the input; 0: none


@dataclass
class TrainConfig:
    max_steps: int = 2000
    max_seconds: float = 300.0  # wall budget; training stops at whichever comes first
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.1   # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.0
    adam_beta2: Optional[float] = None   # AdamW's second-moment decay; unset: torch's 0.999
    grad_clip: float = 1.0
    ema_decay: float = 0.995    # 0 turns EMA off
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    threads: int = 0            # 0: all cores
    processes: int = 1          # >1: torch.distributed (DDP) via torchrun
    device: str = "auto"        # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N (components/device.py)
    precision: str = "auto"     # auto (fp32 on CPU, bf16 on a GPU with it) | fp32 | bf16 | fp16 (GPU only)


@dataclass
class SampleConfig:
    sampler: Literal["ddpm", "ddim"] = "ddim"
    steps: int = 50             # diffusion sampling steps (<= timesteps); mdlm: K denoising steps
    eta: float = 0.0            # DDIM stochasticity
    guidance: float = 2.0       # classifier-free guidance scale (1 = conditional only)
    temperature: float = 1.0
    top_k: int = 0              # 0: no top-k truncation
    length: int = 256           # text: characters to generate per sample
    prompt: str = ""
    decoding: Literal["greedy", "sample", "beam"] = "greedy"   # sequence-to-sequence models
    beam_width: int = 4         # decoding: beam


@dataclass
class EvalConfig:
    num_samples: int = 360      # generated images compared against the test split
    sampler_sweep: list[str] = field(default_factory=lambda: ["ddpm", "ddim50", "ddim20", "ddim10"])
    text_samples: int = 4
    ngram_orders: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6])
    # test images completed per inpainting mask (components/evaluation/editing.py; 0: off); a
    # diffusion model runs RePaint with the headline sampler, jumping back inpaint_jump steps
    # inpaint_resample - 1 times (each resample multiplies the network calls), unconditionally
    # (inpaint_label: none) or with the class it infers from the kept pixels (infer), judged on
    # inpaint_label_completions unconditional completions (each one more RePaint run): one
    # completion's fill sways the guess (label right 0.76-0.90 of the time), three 0.85-0.95
    inpaint_samples: int = 50   # per mask: the four masks take ~24 s of the U-Net's evaluation on 2 idle cores
    inpaint_jump: int = 5
    inpaint_resample: int = 1
    inpaint_label: Literal["none", "infer"] = "infer"
    inpaint_label_completions: int = 3
    guidance_sweep: Optional[list[float]] = None   # prompt-conditioned models: guidance scales evaluated


# ModelConfig fields (dotted: of its sections) that default to None and stay out of to_dict while None
OPTIONAL_MODEL_SECTIONS = ("textenc", "cross_attention", "eval.guidance_sweep", "train.adam_beta2")


@dataclass
class ModelConfig:
    family: Literal["diffusion", "transformer"] = "diffusion"
    dataset: str = ""
    backbone: str = "unet"     # a name in components.families.base.BACKBONES
    unet: UNetConfig = field(default_factory=UNetConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    gpt: GPTConfig = field(default_factory=GPTConfig)
    encdec: EncDecConfig = field(default_factory=EncDecConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    # prompt-conditioned models only; absent (None) sections stay out of to_dict and so out of
    # every params hash: adding them left the other models' hashes (and skip-if-unchanged) as they were
    textenc: Optional[TextEncoderConfig] = None
    cross_attention: Optional[CrossAttentionConfig] = None
    masked: MaskedDiffusionConfig = field(default_factory=MaskedDiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    enabled: bool = True        # part of a plain `genflow run`; --only overrides


# ---------------------------------------------------------------------------
# Pipeline-wide sections
# ---------------------------------------------------------------------------

@dataclass
class PromotionRule:
    metric: str = "eval/fd"
    direction: Literal["min", "max"] = "min"
    min_improvement: float = 0.0   # relative: 0.02 means 2% better than the champion


@dataclass
class PromotionConfig:
    rules: dict[str, PromotionRule] = field(default_factory=dict)  # model key -> rule
    default: PromotionRule = field(default_factory=PromotionRule)
    max_sample_slowdown: float = 0.25  # guardrail: sampling may be at most 25% slower


@dataclass
class ExportConfig:
    opset: int = 20
    parity_atol: float = 1e-4
    parity_rtol: float = 1e-3


@dataclass
class ScheduleConfig:
    cron: str = "0 3 * * *"
    timezone: str = "UTC"


@dataclass
class TrackingConfig:
    experiment_prefix: str = "genflow"   # experiment name = <prefix>-<dataset>
    tracking_uri: str = ""               # empty: MLFLOW_TRACKING_URI or sqlite under .genflow/


@dataclass
class StorageConfig:
    dvc_remote: str = ""   # empty: DVC's default remote; else a remote's name, a folder or a URL


@dataclass
class QuickConfig:
    """`genflow run --quick`: the same chain with tiny budgets, for a first look."""
    max_seconds: float = 20.0
    max_steps: int = 400
    num_samples: int = 100
    sampler_sweep: list[str] = field(default_factory=lambda: ["ddim10"])
    text_samples: int = 2
    inpaint_samples: int = 20


@dataclass
class PipelineConfig:
    max_parallel_models: int = 1       # models trained at once; >1 only pays with spare cores
    step_timeout_seconds: float = 1800.0
    server_retries: int = 3            # retries (with backoff) for steps that talk to servers
    quick: QuickConfig = field(default_factory=QuickConfig)


@dataclass
class Params:
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def model(self, key: str) -> ModelConfig:
        if key not in self.models:
            raise ParamsError(f"models.{key}: no such model; known: {', '.join(self.models)}")
        return self.models[key]

    def dataset(self, name: str) -> DatasetConfig:
        if name not in self.datasets:
            raise ParamsError(f"datasets.{name}: no such dataset; known: {', '.join(self.datasets)}")
        return self.datasets[name]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for model in out["models"].values():   # a model without an optional section hashes as before it existed
            for path in OPTIONAL_MODEL_SECTIONS:
                *parents, name = path.split(".")
                node = model
                for part in parents:
                    node = node.get(part) or {}
                if name in node and node[name] is None:
                    del node[name]
        return out

    def section_hash(self, *keys: str) -> str:
        """Short hash of one section, e.g. section_hash('models', 'digits-unet')."""
        node: Any = self.to_dict()
        for k in keys:
            node = node[k]
        return hash_json(node)

    def hash(self) -> str:
        return hash_json(self.to_dict())


def hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently coerce) one value against its annotated type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping ({tp.__name__}), got {value!r}")
        return _build(tp, value, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ParamsError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is Union:  # Optional[X]
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(value, inner[0], where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ParamsError(f"{where}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected str, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ParamsError(f"{prefix}{unknown[0]}: unknown key; expected one of {', '.join(sorted(names))}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """A --set value is YAML: 200, 2e-3, true, [32, 64], imagefolder:/x all parse as expected."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML reads "imagefolder:/x" as a string already; "1e-3" as a string in YAML 1.1
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``KEY=VALUE`` overrides (dotted keys; model keys may contain '-')."""
    for item in overrides:
        if "=" not in item:
            raise ParamsError(f"--set {item}: expected KEY=VALUE, e.g. models.digits-unet.train.max_steps=200")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ParamsError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a mapping")
            node = child
        node[parts[-1]] = _parse_scalar(text)
    return raw


def _check_links(params: Params) -> None:
    from components.families.registry import BACKBONES  # torch-free; imports no other genflow module

    for key, m in params.models.items():
        if m.dataset not in params.datasets:
            raise ParamsError(f"models.{key}.dataset: unknown dataset {m.dataset!r}; "
                              f"known: {', '.join(params.datasets) or 'none'}")
        if m.backbone not in BACKBONES:
            raise ParamsError(f"models.{key}.backbone: expected one of {' | '.join(map(repr, BACKBONES))}, "
                              f"got {m.backbone!r}")
        entry = BACKBONES[m.backbone]
        kind = params.datasets[m.dataset].kind
        if kind not in entry.data_kinds:
            want = " or ".join(entry.data_kinds)
            raise ParamsError(f"models.{key}.backbone: {m.backbone} needs an {want} dataset, "
                              f"but {m.dataset} is {kind}")
        for name in ("textenc", "cross_attention"):   # an optional section its backbone ignores: say so
            if getattr(m, name) is not None and name not in entry.reads:
                readers = ", ".join(b for b, e in BACKBONES.items() if name in e.reads)
                raise ParamsError(f"models.{key}.{name}: backbone {m.backbone} does not read it (only {readers} "
                                  "does); drop the section or change the backbone")
        if m.family != entry.family_name:
            raise ParamsError(f"models.{key}.family: backbone {m.backbone} is a {entry.family_name} model, "
                              f"not {m.family}")
        b2 = m.train.adam_beta2
        if b2 is not None and not 0.0 <= b2 < 1.0:   # its type the loader has checked
            raise ParamsError(f"models.{key}.train.adam_beta2: must be a number in [0, 1) (AdamW's second-moment "
                              f"decay; leave it out for 0.999), got {b2!r}")
        e = m.eval
        if e.inpaint_label_completions < 1:
            raise ParamsError(f"models.{key}.eval.inpaint_label_completions: must be >= 1 (the unconditional "
                              f"completions the inferred class is judged on), got {e.inpaint_label_completions}")
        if e.inpaint_samples < 0 or e.inpaint_jump < 1 or e.inpaint_resample < 1:
            raise ParamsError(f"models.{key}.eval: inpaint_samples must be >= 0 (0: off), inpaint_jump and "
                              f"inpaint_resample >= 1 (1: no resampling), got {e.inpaint_samples}, "
                              f"{e.inpaint_jump}, {e.inpaint_resample}")
    for name, d in params.datasets.items():
        if ":" not in d.source:
            raise ParamsError(f"datasets.{name}.source: {d.source!r} is not KIND:VALUE "
                              "(builtin:digits, builtin:pydoc, builtin:pydoc-pairs, builtin:digits-captions, "
                              "imagefolder:PATH, textfile:PATH, pairs:PATH)")
        if d.channels not in (None, 1, 3):
            raise ParamsError(f"datasets.{name}.channels: expected 1 (grey) or 3 (RGB), or leave it out to take "
                              f"the files as they are, got {d.channels!r}")
        if not 2 <= d.levels <= 256:
            raise ParamsError(f"datasets.{name}.levels: expected 2..256 levels per channel, got {d.levels}")
        s = d.split
        if not (0 <= s.val < 1 and 0 < s.test < 1 and s.val + s.test < 1):
            raise ParamsError(f"datasets.{name}.split: val and test must be shares in [0, 1) "
                              f"summing below 1, got val={s.val} test={s.test}")


def apply_quick(params: Params) -> Params:
    """Shrink every model's budgets to the `pipeline.quick` ones (same chain, minutes not hours)."""
    q = params.pipeline.quick
    for m in params.models.values():
        m.train.max_seconds = min(m.train.max_seconds, q.max_seconds)
        m.train.max_steps = min(m.train.max_steps, q.max_steps)
        m.train.checkpoint_every = min(m.train.checkpoint_every, q.max_steps)
        m.train.warmup_steps = min(m.train.warmup_steps, q.max_steps // 10)
        m.eval.num_samples = min(m.eval.num_samples, q.num_samples)
        m.eval.sampler_sweep = list(q.sampler_sweep)
        m.eval.text_samples = min(m.eval.text_samples, q.text_samples)
        m.eval.inpaint_samples = min(m.eval.inpaint_samples, q.inpaint_samples)
    return params


def load_params(path: str | Path = "params.yaml", overrides: Optional[list[str]] = None) -> Params:
    """Read params.yaml, apply ``--set`` overrides and return checked dataclasses."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the project root or pass --params FILE") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}:{at} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    params = _build(Params, raw, "")
    _check_links(params)
    return params
