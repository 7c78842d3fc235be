"""ONNX export of a trained network, with a parity gate against PyTorch.

    result = export_model("digits-unet", net, config, params.export, root)
    # exports/digits-unet/model.onnx    the graph (weights inside: one file)
    # exports/digits-unet/config.json   all that components/inference/ needs, torch-free
    # exports/digits-unet/parity.json   onnxruntime vs PyTorch on fixed random inputs
    # exports/digits-unet/parity_inputs.npz  the gate's first inputs and outputs, replayed on load
    result["passed"]  # False above export.parity_atol / parity_rtol: the flow does not register it

Graphs, one per backbone kind (dynamic axes named, example sizes >= 2 so none is frozen):

    denoiser   x [B,C,H,W] f32, t [B] i64, y [B] i64 -> eps [B,C,H,W]           unet, dit
    sr_denoiser  the same + lowres [B,C,H/f,W/f] f32 (the image to upscale)      unet-sr
    causal_lm  input_ids [B,T] i64, past_kv [L,2,B,nh,P,hs] f32
                 -> logits [B,T,V], present_kv [L,2,B,nh,P+T,hs]                 gpt
    masked_lm  input_ids [B,T] i64 -> logits [B,T,V]                            mdlm
    encoder_decoder  two graphs:                                                 encdec
      encoder.onnx  src_ids [B,S] i64, src_mask [B,S] bool -> cross_kv [L,2,B,nh,S,hs]
      model.onnx    input_ids [B,T] i64, past_kv [L,2,B,nh,P,hs] f32, cross_kv, src_mask
                      -> logits [B,T,V], present_kv [L,2,B,nh,P+T,hs]          (one decoder step)
      The cross-attention keys/values are computed once per source by the encoder graph and fed to
      every step; model.onnx is the step so that registration logs it as the model and the encoder
      goes along as an extra file (components/registry/register.py, unchanged).
    text_denoiser  two graphs:                                                   unet-text
      text_encoder.onnx  prompt_ids [B,L] i64 -> states [B,L,D] f32, prompt_mask [B,L] bool   once per prompt
      model.onnx         x [B,C,H,W] f32, t [B] i64, states, prompt_mask -> eps [B,C,H,W]  every step
    text_encoder  prompt_ids [B,L] i64 -> states [B,L,D] f32, prompt_mask [B,L] bool     textenc
      The prompt encoder of prompt-conditioned models (components/models/textenc.py), exported
      beside their own graph by ``export_text_encoder`` (TorchScript, like the encoder above).

The GPT has one graph for prefill and decoding: onnxruntime accepts an empty past (P = 0), so
generation is prefill(prompt, empty past) then decode(token, past), with no second file.

Exporter and opset (measured on a 2-core CPU, torch 2.13, onnxruntime 1.32; STACK.md):
  * denoisers: the TorchScript exporter (``dynamo=False``) at ``export.opset`` (20): 0.2-0.8 s per
    graph against 6-19 s for the dynamo exporter, same speed and parity on onnxruntime; GroupNorm
    has a native CPU kernel up to opset 20 (from 21 on it is expanded, 5-15% slower).
  * attention models (gpt, mdlm): the dynamo exporter at opset >= 23, whose fused Attention op
    made cached decoding 20-28% faster on onnxruntime CPU; the export takes 7-15 s once per model.
  The TorchScript exporter stops at opset 20; above that the dynamo one is used whatever the plan.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from components.config import ExportConfig
from components.errors import ModelError, disk_full
from components.families.registry import ATTENTION_MIN_OPSET, BACKBONES, Backbone, backbone_of_class  # noqa: F401
from components.faults import kill_point
from components.files import replaced_dir
from components.layout import Layout
from components.spec import ModelSpec

EXPORT_FORMAT = 1          # version of the exported folder's layout (config.json "format")
TORCHSCRIPT_MAX_OPSET = 20
# Each backbone's export plan (graph kind, exporter, minimum opset) is its registry entry:
# components.families.base.BACKBONES; the opset is max(export.opset, its min_opset).
SAMPLE_KEYS = ("sampler", "steps", "eta", "guidance", "temperature", "top_k", "length", "prompt")


class ExportError(ModelError):
    """The model cannot be exported as asked; the message names the field or file."""


def backbone_of(model: Any, config: dict) -> Backbone:
    """The registry entry of the network: config["backbone"], else the network's class."""
    name = config.get("backbone")
    entry = BACKBONES.get(name) if name else backbone_of_class(type(model).__name__)
    if entry is None:
        raise ExportError(f"config.backbone: {name!r} has no ONNX export; known: {', '.join(BACKBONES)}")
    return entry


# ---------------------------------------------------------------------------
# Graph specification per kind
# ---------------------------------------------------------------------------

@dataclass
class GraphSpec:
    """What to export and how: the module to trace, example inputs, names, dynamic axes."""
    kind: str
    module: Any                                   # torch.nn.Module with forward(*input_names)
    example: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic: dict[str, dict[int, str]]            # input or output name -> {axis: name}
    limits: dict[str, tuple[int, Optional[int]]] = field(default_factory=dict)  # axis name -> (min, max)
    info: dict[str, Any] = field(default_factory=dict)   # goes into config.json
    companions: dict[str, "GraphSpec"] = field(default_factory=dict)  # more graphs, written as <name>.onnx


def _wrap(kind: str, net: Any) -> Any:
    """A module whose forward takes the graph's inputs by name (and returns plain tensors)."""
    import torch

    class CausalLMGraph(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, input_ids, past_kv):
            return self.net(input_ids, past_kv)

    class MaskedLMGraph(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, input_ids):
            out = self.net(input_ids)
            return out[0] if isinstance(out, (tuple, list)) else out

    class EncoderGraph(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, src_ids, src_mask):
            return self.net.encode(src_ids, src_mask)

    class DecoderStepGraph(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, input_ids, past_kv, cross_kv, src_mask):
            return self.net.decode(input_ids, cross_kv, src_mask, past_kv)

    class TextDenoiserGraph(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t, states, prompt_mask):
            return self.net.denoise_states(x, t, states, prompt_mask)

    class TextEncoderGraph(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, prompt_ids):
            return self.net(prompt_ids)

    return {"denoiser": lambda n: n, "sr_denoiser": lambda n: n, "causal_lm": CausalLMGraph, "masked_lm": MaskedLMGraph,
            "encoder": EncoderGraph, "encoder_decoder": DecoderStepGraph, "text_encoder": TextEncoderGraph,
            "text_denoiser": TextDenoiserGraph}[kind](net)


def text_encoder_spec(net: Any, tokenizer: Any) -> GraphSpec:
    """The text encoder's graph; its info holds what a torch-free caller needs to tokenize prompts."""
    import torch

    c = net.config
    info = dict(vocab=tokenizer.vocab, vocab_size=int(net.vocab_size), context=int(c.context), n_embd=c.n_embd,
                start_id=tokenizer.start_id, pad_id=tokenizer.pad_id)
    ids = torch.full((2, min(5, c.context)), tokenizer.start_id, dtype=torch.long)
    return GraphSpec("text_encoder", _wrap("text_encoder", net), (ids,), ["prompt_ids"], ["states", "prompt_mask"],
                     {"prompt_ids": {0: "batch", 1: "prompt"}, "states": {0: "batch", 1: "prompt"},
                      "prompt_mask": {0: "batch", 1: "prompt"}},
                     {"batch": (1, None), "prompt": (1, c.context)}, info)


def encoder_decoder_spec(net: Any, ms: ModelSpec, sample: dict, config: Optional[dict] = None) -> GraphSpec:
    """The decoder-step graph (model.onnx) with the encoder graph as its companion (encoder.onnx).
    Pairs models take their token ids from the PairTokenizer; a prompt-to-pixels model's spec
    carries its own (components/families/captions_encdec.py: grey levels, shifted prompt ids)."""
    import torch

    c = net.config
    L, H, D = c.n_layer_dec, c.n_head, c.n_embd // c.n_head
    config = config or {}
    if "allowed_tokens" in config:
        ids = {k: int(config[k]) for k in ("bos_id", "eos_id", "pad_id", "allowed_tokens")}
        ids.update(image_size=int(config["image_size"]), levels=int(config["levels"]),
                   channels=int(config.get("channels", 1)), prompt_offset=int(config["levels"]))
    else:
        from components.tokenizer import PairTokenizer

        tok = PairTokenizer(ms.vocab or "")
        ids = dict(bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, allowed_tokens=tok.allowed_tokens)
    info = dict(vocab_size=int(net.vocab_size), n_layer=L, n_head=H, head_dim=D, n_embd=c.n_embd,
                source_len=c.source_len, target_len=c.target_len, truncate_source=bool(c.truncate_source),
                vocab=ms.vocab, **ids, sample=sample, kind=ms.kind,
                files={"model": "model.onnx", "encoder": "encoder.onnx"})
    B, S, T, P = 2, min(5, c.source_len), min(3, c.target_len), min(4, c.target_len - 1)   # distinct sizes
    src, mask = torch.zeros(B, S, dtype=torch.long), torch.ones(B, S, dtype=torch.bool)
    encoder = GraphSpec("encoder", _wrap("encoder", net), (src, mask), ["src_ids", "src_mask"], ["cross_kv"],
                        {"src_ids": {0: "batch", 1: "source"}, "src_mask": {0: "batch", 1: "source"},
                         "cross_kv": {2: "batch", 4: "source"}},
                        {"batch": (1, None), "source": (1, c.source_len)})
    cross = torch.zeros(L, 2, B, H, S, D)
    past = torch.zeros(L, 2, B, H, P, D)
    ids = torch.zeros(B, T, dtype=torch.long)
    return GraphSpec("encoder_decoder", _wrap("encoder_decoder", net), (ids, past, cross, mask),
                     ["input_ids", "past_kv", "cross_kv", "src_mask"], ["logits", "present_kv"],
                     {"input_ids": {0: "batch", 1: "seq"}, "past_kv": {2: "batch", 4: "past"},
                      "cross_kv": {2: "batch", 4: "source"}, "src_mask": {0: "batch", 1: "source"},
                      "logits": {0: "batch", 1: "seq"}, "present_kv": {2: "batch", 4: "total"}},
                     {"batch": (1, None), "seq": (1, c.target_len), "past": (0, c.target_len),
                      "source": (1, c.source_len)}, info, companions={"encoder": encoder})


def text_denoiser_spec(net: Any, config: dict, ms: ModelSpec, sample: dict) -> GraphSpec:
    """The prompt-conditioned denoiser (model.onnx: x, t and the encoded prompt -> eps) with the text
    encoder as its companion (text_encoder.onnx): prompts are encoded once, then every step reads them."""
    import torch

    from components.sampling.diffusion import make_alphas_cumprod
    from components.tokenizer import PromptTokenizer

    tok = PromptTokenizer(config["vocab"], config["textenc"]["context"])
    encoder = text_encoder_spec(net.text, tok)
    d = ms.process
    abar = [float(a) for a in make_alphas_cumprod(int(d["timesteps"]), str(d.get("schedule") or "cosine"))]
    size, channels = int(ms.image_size), int(ms.channels)
    info = dict(image_size=size, channels=channels, num_classes=0, levels=ms.levels or 256,
                classes=list(ms.classes) or None, timesteps=len(abar), schedule=d.get("schedule") or "cosine",
                alphas_cumprod=abar, sample=sample, caption_thresholds=config.get("caption_thresholds"),
                **{k: encoder.info[k] for k in ("vocab", "context", "start_id", "pad_id", "n_embd")},
                files={"model": "model.onnx", "text_encoder": "text_encoder.onnx"})
    B, L = 2, 3                                                                 # distinct example sizes
    example = (torch.zeros(B, channels, size, size), torch.tensor([1, len(abar) - 1], dtype=torch.long),
               torch.zeros(B, L, encoder.info["n_embd"]), torch.ones(B, L, dtype=torch.bool))
    batch, prompt = {0: "batch"}, {0: "batch", 1: "prompt"}
    return GraphSpec("text_denoiser", _wrap("text_denoiser", net), example, ["x", "t", "states", "prompt_mask"],
                     ["eps"], {"x": batch, "t": batch, "states": prompt, "prompt_mask": prompt, "eps": batch},
                     {"batch": (1, None), "prompt": (1, encoder.info["context"])}, info,
                     companions={"text_encoder": encoder})


def graph_spec(entry: Union[str, Backbone], net: Any, config: dict) -> GraphSpec:
    """Example inputs, names and dynamic axes for one network (a backbone name or registry entry),
    plus what the engine must know."""
    import torch

    kind = (BACKBONES[entry] if isinstance(entry, str) else entry).graph
    ms = ModelSpec.from_config(config)
    sample = {k: v for k, v in ms.sample.items() if k in SAMPLE_KEYS}
    if kind in ("denoiser", "sr_denoiser"):
        size = int(getattr(net, "image_size", None) or ms.image_size)
        channels = int(getattr(net, "in_channels", None) or ms.channels)
        num_classes = int(getattr(net, "num_classes", None) or ms.num_classes)
        timesteps = ms.process.get("timesteps")
        schedule = ms.process.get("schedule") or "cosine"
        abar = ms.process.get("alphas_cumprod")
        if abar is None:
            if timesteps is None:
                raise ExportError("config.diffusion.timesteps: missing; the engine needs the noise schedule")
            from components.sampling.diffusion import make_alphas_cumprod

            abar = make_alphas_cumprod(int(timesteps), str(schedule))
        abar = [float(a) for a in np.asarray(abar, dtype=np.float64)]
        if not size or not num_classes:
            raise ExportError("config.image_size / num_classes: missing; cannot build example inputs")
        B = 2
        example = (torch.zeros(B, channels, size, size), torch.tensor([1, len(abar) - 1], dtype=torch.long),
                   torch.tensor([0, num_classes], dtype=torch.long))
        batch = {0: "batch"}
        info = dict(image_size=size, channels=channels, num_classes=num_classes, null_class=num_classes,
                    levels=ms.levels or 256, classes=list(ms.classes) or None, timesteps=len(abar), schedule=schedule,
                    alphas_cumprod=abar, sample=sample)
        names, dynamic = ["x", "t", "y"], {"x": batch, "t": batch, "y": batch, "eps": batch}
        if kind == "sr_denoiser":   # the low-res image to upscale: one more input, at 1/factor of the size
            factor = int(ms.condition.get("factor") or 0)
            if factor < 2 or size % factor:
                raise ExportError(f"config.condition.factor: {factor!r} does not divide image_size {size}")
            example += (torch.zeros(B, channels, size // factor, size // factor),)
            names, dynamic["lowres"] = names + ["lowres"], batch
            info.update(factor=factor, lowres_size=size // factor, upsample=ms.condition.get("upsample"))
        return GraphSpec(kind, _wrap(kind, net), example, names, ["eps"], dynamic, {"batch": (1, None)}, info)

    if kind == "encoder_decoder":
        return encoder_decoder_spec(net, ms, sample, config)
    if kind == "text_denoiser":
        return text_denoiser_spec(net, config, ms, sample)
    c = net.config
    vocab_size, block = int(net.vocab_size), int(c.block_size)
    head_dim = c.n_embd // c.n_head
    info = dict(vocab_size=vocab_size, block_size=block, n_layer=c.n_layer, n_head=c.n_head,
                head_dim=head_dim, n_embd=c.n_embd, vocab=ms.vocab, sample=sample)
    info["kind"] = ms.kind
    if ms.kind == "image":  # pixels: [class token] + image_size^2 x channels value tokens (a pixel's channels together)
        levels, num_classes, size, channels = ms.levels, ms.num_classes, ms.image_size, int(ms.channels or 1)
        class_offset = int(config.get("class_token_offset", levels))
        pixel_offset = int(config.get("pixel_token_offset", 0))
        if not (levels and num_classes and size):
            raise ExportError("config.levels / num_classes / image_size: missing for an image GPT")
        if class_offset + num_classes > vocab_size or pixel_offset + levels > vocab_size:
            raise ExportError(f"config.class_token_offset: classes at {class_offset}.. and pixels at "
                              f"{pixel_offset}.. do not fit the vocabulary of {vocab_size} tokens")
        if size * size * channels > block:   # the last value is never an input
            raise ExportError(f"gpt.block_size: {block} is shorter than a class token + {size * size * channels} "
                              f"values less the last; set it to at least {size * size * channels}")
        info.update(levels=levels, num_classes=num_classes, image_size=size, channels=channels,
                    labelled=bool(config.get("labelled", True)),
                    classes=list(ms.classes) or None, class_token_offset=class_offset,
                    pixel_token_offset=pixel_offset)
    # distinct example sizes: equal ones could be merged into one symbol by the exporter
    B, T, P = 2, min(3, max(block - 2, 1)), min(4, max(block - 3, 1))
    ids = torch.zeros(B, T, dtype=torch.long)
    if kind == "masked_lm":
        # logits cover ids 0..mask_id-1: the [MASK] id (the last one) is input only
        info["mask_id"] = int(getattr(net, "mask_id", ms.mask_id if ms.mask_id is not None else vocab_size - 1))
        return GraphSpec(kind, _wrap(kind, net), (ids,), ["input_ids"], ["logits"],
                         {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
                         {"batch": (1, None), "seq": (1, block)}, info)
    past = torch.zeros(c.n_layer, 2, B, c.n_head, P, head_dim)
    return GraphSpec(kind, _wrap(kind, net), (ids, past), ["input_ids", "past_kv"], ["logits", "present_kv"],
                     {"input_ids": {0: "batch", 1: "seq"}, "past_kv": {2: "batch", 4: "past"},
                      "logits": {0: "batch", 1: "seq"}, "present_kv": {2: "batch", 4: "total"}},
                     {"batch": (1, None), "seq": (1, block), "past": (0, block)}, info)


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------

def _export_graph(spec: GraphSpec, path: Path, exporter: str, opset: int) -> None:
    """Write spec's module to `path` as one self-contained ONNX file."""
    import torch

    quiet = io.StringIO()  # the dynamo exporter prints progress lines; keep the stage's log readable
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings and the TorchScript exporter's deprecation
        if exporter == "torchscript":
            torch.onnx.export(spec.module, spec.example, str(path), dynamo=False, opset_version=opset,
                              input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_axes=spec.dynamic, do_constant_folding=True)
        else:
            dims = {name: torch.export.Dim(name, min=lo, max=hi) if hi else torch.export.Dim(name, min=lo)
                    for name, (lo, hi) in spec.limits.items()}
            shapes = {n: {axis: dims[label] for axis, label in spec.dynamic[n].items()} for n in spec.input_names}
            torch.onnx.export(spec.module, spec.example, str(path), dynamo=True, opset_version=opset,
                              input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_shapes=shapes, external_data=False, optimize=True, verbose=False)


def check_onnx(path: Path) -> int:
    """onnx.checker with full_check (shape inference included); returns the default-domain opset."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _io(path: Path) -> tuple[list[dict], list[dict]]:
    """Names, element types and shapes (dim names for dynamic axes) of the graph's inputs/outputs."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    init = {t.name for t in g.initializer}

    def describe(vi):
        t = vi.type.tensor_type
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]}

    return [describe(i) for i in g.input if i.name not in init], [describe(o) for o in g.output]


# ---------------------------------------------------------------------------
# Parity gate
# ---------------------------------------------------------------------------

def _compare(name: str, output: str, got: np.ndarray, ref: np.ndarray) -> dict:
    if got.shape != ref.shape:
        return {"name": name, "output": output, "shape": list(ref.shape), "max_abs": math.inf,
                "max_rel": math.inf, "note": f"onnxruntime shape {list(got.shape)}"}
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    if not np.isfinite(got).all():
        max_abs = math.inf
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return {"name": name, "output": output, "shape": list(ref.shape), "max_abs": max_abs,
            "max_rel": max_rel, "ref_max": scale}


def _encoder_decoder_checks(spec: GraphSpec, net: Any, session: Any, encoder: Any) -> list[dict]:
    """Both graphs against PyTorch: the encoder (padded batches), then decoder steps without a past,
    with a past and one token, and with a past and a chunk, on the encoder's real cross K/V."""
    import torch

    rng = np.random.default_rng(0)
    V, S_max, T_max = spec.info["vocab_size"], spec.info["source_len"], spec.info["target_len"]
    L, H, D = spec.info["n_layer"], spec.info["n_head"], spec.info["head_dim"]
    checks = []
    with torch.no_grad():
        for B, S in ((1, 1), (3, min(7, S_max)), (2, S_max)):
            src = rng.integers(0, V, (B, S)).astype(np.int64)
            mask = np.arange(S)[None, :] < rng.integers(1, S + 1, (B, 1))   # real prefixes, padding after
            mask[0] = True
            cross = net.encode(torch.from_numpy(src), torch.from_numpy(mask))
            got = encoder.run(["cross_kv"], {"src_ids": src, "src_mask": mask})[0]
            checks.append(_compare(f"encoder, batch={B} source={S}", "cross_kv", got, cross.numpy()))
            for P, T in ((0, min(5, T_max)), (min(4, T_max - 1), 1), (max(T_max - 3, 0), min(3, T_max))):
                if P + T > T_max:
                    continue
                ids = rng.integers(0, V, (B, P + T)).astype(np.int64)
                past = net.decode(torch.from_numpy(ids[:, :P]), cross, torch.from_numpy(mask))[1] if P else \
                    torch.zeros(L, 2, B, H, 0, D)
                logits, present = net.decode(torch.from_numpy(ids[:, P:]), cross, torch.from_numpy(mask), past)
                got_logits, got_present = session.run(["logits", "present_kv"], {
                    "input_ids": np.ascontiguousarray(ids[:, P:]), "past_kv": past.numpy(),
                    "cross_kv": cross.numpy(), "src_mask": mask})
                name = f"decoder step, batch={B} source={S} past={P} len={T}"
                checks.append(_compare(name, "logits", got_logits, logits.numpy()))
                checks.append(_compare(name, "present_kv", got_present, present.numpy()))
    return checks


def _text_encoder_checks(spec: GraphSpec, net: Any, session: Any) -> list[dict]:
    """Prompts of random characters and lengths, padded to the batch's length (the null prompt, the
    start id alone, in every batch), against PyTorch."""
    import torch

    rng = np.random.default_rng(0)
    n_chars, start, pad, ctx = len(spec.info["vocab"]), spec.info["start_id"], spec.info["pad_id"], spec.info["context"]
    checks = []
    with torch.no_grad():
        for B, L in ((1, 1), (3, min(7, ctx)), (2, ctx)):
            ids = rng.integers(0, n_chars, (B, L)).astype(np.int64)
            ids[:, 0] = start
            lengths = rng.integers(1, L + 1, B)
            lengths[-1] = 1   # the null prompt
            ids[np.arange(L)[None, :] >= lengths[:, None]] = pad
            states, mask = net(torch.from_numpy(ids))
            got_states, got_mask = session.run(["states", "prompt_mask"], {"prompt_ids": ids})
            checks.append(_compare(f"batch={B} len={L}", "states", got_states, states.numpy()))
            checks.append(_compare(f"batch={B} len={L}", "prompt_mask", got_mask.astype(np.float32),
                                   mask.numpy().astype(np.float32)))
    return checks


def _text_denoiser_checks(spec: GraphSpec, net: Any, session: Any, encoder: Any) -> list[dict]:
    """The text encoder graph (its own checks), then the denoiser on the states PyTorch's encoder gives
    for random prompts (the null prompt in every batch), against PyTorch's denoise_states."""
    import torch

    checks = [{**c, "name": f"text encoder, {c['name']}"}
              for c in _text_encoder_checks(spec.companions["text_encoder"], net.text, encoder)]
    rng = np.random.default_rng(1)
    info = spec.info
    C, S, T, ctx = info["channels"], info["image_size"], info["timesteps"], info["context"]
    with torch.no_grad():
        for B, L in ((1, 1), (3, min(7, ctx)), (16, ctx)):
            ids = rng.integers(0, len(info["vocab"]), (B, L)).astype(np.int64)
            ids[:, 0] = info["start_id"]
            lengths = rng.integers(1, L + 1, B)
            lengths[-1] = 1                                                   # the null prompt
            ids[np.arange(L)[None, :] >= lengths[:, None]] = info["pad_id"]
            states, mask = net.text(torch.from_numpy(ids))
            x = rng.standard_normal((B, C, S, S)).astype(np.float32)
            t = rng.integers(0, T, B).astype(np.int64)
            ref = net.denoise_states(torch.from_numpy(x), torch.from_numpy(t), states, mask).numpy()
            got = session.run(["eps"], {"x": x, "t": t, "states": states.numpy(), "prompt_mask": mask.numpy()})[0]
            checks.append(_compare(f"denoiser, batch={B} prompt={L}", "eps", got, ref))
    return checks


def _parity_checks(spec: GraphSpec, net: Any, session: Any, companions: Optional[dict] = None) -> list[dict]:
    """onnxruntime against PyTorch eager on fixed random inputs; one dict per (case, output)."""
    import torch

    if spec.kind == "text_encoder":
        return _text_encoder_checks(spec, net, session)
    if spec.kind == "encoder_decoder":
        return _encoder_decoder_checks(spec, net, session, (companions or {})["encoder"])
    if spec.kind == "text_denoiser":
        return _text_denoiser_checks(spec, net, session, (companions or {})["text_encoder"])
    rng = np.random.default_rng(0)
    checks = []
    with torch.no_grad():
        if spec.kind in ("denoiser", "sr_denoiser"):
            C, S = spec.info["channels"], spec.info["image_size"]
            T, K = spec.info["timesteps"], spec.info["num_classes"]
            for B in (1, 3, 16):
                x = rng.standard_normal((B, C, S, S)).astype(np.float32)
                t = rng.integers(0, T, B).astype(np.int64)
                y = rng.integers(0, K + 1, B).astype(np.int64)  # the null class included
                feed = {"x": x, "t": t, "y": y}
                if spec.kind == "sr_denoiser":   # low-res images in the data range
                    s = spec.info["lowres_size"]
                    feed["lowres"] = rng.uniform(-1, 1, (B, C, s, s)).astype(np.float32)
                ref = net(*(torch.from_numpy(v) for v in feed.values())).numpy()
                got = session.run(["eps"], feed)[0]
                checks.append(_compare(f"batch={B}", "eps", got, ref))
            return checks

        V, block = spec.info["vocab_size"], spec.info["block_size"]
        if spec.kind == "masked_lm":
            for B, T in ((1, 1), (3, min(7, block)), (2, block)):
                ids = rng.integers(0, V, (B, T)).astype(np.int64)
                out = spec.module(torch.from_numpy(ids))
                checks.append(_compare(f"batch={B} len={T}", "logits",
                                       session.run(["logits"], {"input_ids": ids})[0], out.numpy()))
            return checks

        L, H, D = spec.info["n_layer"], spec.info["n_head"], spec.info["head_dim"]
        # without the cache: PyTorch's own no-past path against the graph with an empty past
        for B, T in ((1, 1), (3, min(7, block)), (2, block)):
            ids = rng.integers(0, V, (B, T)).astype(np.int64)
            logits, _ = net(torch.from_numpy(ids))
            got = session.run(["logits"], {"input_ids": ids,
                                           "past_kv": np.zeros((L, 2, B, H, 0, D), np.float32)})[0]
            checks.append(_compare(f"no cache, batch={B} len={T}", "logits", got, logits.numpy()))
        # with the cache: a real past (from a prefix), then one token (decode) or a chunk
        for B, P, T in ((1, max(block - 1, 1) // 2, 1), (3, max(block - 4, 1), min(4, block - 1)), (2, block - 1, 1)):
            if P < 1 or T < 1 or P + T > block:
                continue
            ids = rng.integers(0, V, (B, P + T)).astype(np.int64)
            _, past = net(torch.from_numpy(ids[:, :P]))
            logits, present = net(torch.from_numpy(ids[:, P:]), past)
            got_logits, got_present = session.run(["logits", "present_kv"],
                                                  {"input_ids": np.ascontiguousarray(ids[:, P:]),
                                                   "past_kv": past.numpy()})
            name = f"cache, batch={B} past={P} len={T}"
            checks.append(_compare(name, "logits", got_logits, logits.numpy()))
            checks.append(_compare(name, "present_kv", got_present, present.numpy()))
    return checks


def check_parity(spec: GraphSpec, net: Any, onnx_path: Path, export_cfg: ExportConfig,
                 record_file: Optional[str] = None) -> dict:
    """Run the checks on `onnx_path` (and its companion graphs beside it, <name>.onnx) and apply the
    gate: max_abs <= parity_atol and max_rel <= parity_rtol. The first call's inputs and outputs are
    kept beside the graph in `record_file` (parity_inputs.npz unless told otherwise).

    max_rel is relative to the output's scale: max |ort - torch| / max |torch|, per check.
    """
    from components.inference import make_session
    from components.inference.replay import PARITY_INPUTS_FILE, RecordingSession, save_record

    session, _ = make_session(Path(onnx_path), prefer_gpu=False)  # CPU: the reference is CPU PyTorch
    session = RecordingSession(session)   # its first call is kept for whoever loads the graph later
    companions = {name: make_session(Path(onnx_path).parent / f"{name}.onnx", prefer_gpu=False)[0]
                  for name in spec.companions}
    checks = _parity_checks(spec, net, session, companions)
    worst_abs = max(checks, key=lambda c: c["max_abs"])
    worst_rel = max(checks, key=lambda c: c["max_rel"])
    max_abs, max_rel = worst_abs["max_abs"], worst_rel["max_rel"]
    atol, rtol = float(export_cfg.parity_atol), float(export_cfg.parity_rtol)
    result = {"passed": bool(max_abs <= atol and max_rel <= rtol), "max_abs": max_abs, "max_rel": max_rel,
              "atol": atol, "rtol": rtol, "checks": checks}
    save_record(Path(onnx_path).parent / (record_file or PARITY_INPUTS_FILE), session.record, atol)
    if not max_abs <= atol:  # NaN and inf fail here too
        result["reason"] = (f"max abs error {max_abs:.3g} ({worst_abs['output']}, {worst_abs['name']}) "
                            f"above export.parity_atol {atol:g}")
    elif not max_rel <= rtol:
        result["reason"] = (f"max relative error {max_rel:.3g} ({worst_rel['output']}, {worst_rel['name']}) "
                            f"above export.parity_rtol {rtol:g}")
    return result


# ---------------------------------------------------------------------------
# The whole export
# ---------------------------------------------------------------------------

def export_text_encoder(net: Any, tokenizer: Any, path: Path, export_cfg: ExportConfig, *,
                        exporter: str = "torchscript", opset: Optional[int] = None) -> dict:
    """Write a text encoder (components/models/textenc.py) to `path` (e.g. exports/<key>/text_encoder.onnx),
    check it with onnx.checker and its parity against PyTorch; returns check_parity's dict plus
    "opset", "exporter" and "info" (vocab, context, start and pad ids: what config.json needs)."""
    opset = int(opset if opset is not None else export_cfg.opset)
    if exporter == "torchscript" and opset > TORCHSCRIPT_MAX_OPSET:
        exporter = "dynamo"
    was_training = net.training
    net.eval()
    try:
        spec = text_encoder_spec(net, tokenizer)
        try:
            _export_graph(spec, Path(path), exporter, opset)
            file_opset = check_onnx(Path(path))
        except Exception as e:
            raise ExportError(f"text encoder: the {exporter} ONNX export at opset {opset} failed "
                              f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]})") from e
        # its own record file: the model's parity_inputs.npz beside it stays the model's
        parity = check_parity(spec, net, Path(path), export_cfg, record_file=f"{Path(path).stem}_parity_inputs.npz")
    finally:
        net.train(was_training)
    return {**parity, "opset": file_opset, "exporter": exporter, "info": spec.info}


def _json_safe(obj: Any) -> Any:
    """inf/NaN as strings: strict JSON has no such numbers."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(_json_safe(obj), indent=2) + "\n")


def export_model(key: str, model: Any, config: dict, export_cfg: ExportConfig, root: Path, *,
                 exporter: Optional[str] = None, opset: Optional[int] = None) -> dict:
    """Export `model` to exports/<key>/ (model.onnx, config.json, parity.json) and check parity.

    Returns {"passed", "max_abs", "max_rel", "atol", "rtol", "checks", "opset", "exporter",
    "seconds", "path"} (+ "reason", one line, when not passed). A failed gate does not raise:
    the folder is written so the numbers can be inspected, and its parity.json says passed=false
    (the engine refuses such a folder). exporter ("torchscript" | "dynamo") and opset override
    the plan (benchmarks, tests).
    """
    import torch

    t0 = time.perf_counter()
    entry = backbone_of(model, config)
    kind, plan_exporter, min_opset = entry.graph, entry.exporter, entry.min_opset
    if exporter not in (None, "torchscript", "dynamo"):
        raise ExportError(f"exporter: expected 'torchscript' or 'dynamo', got {exporter!r}")
    if opset is None:
        opset = max(int(export_cfg.opset), min_opset)
        if exporter == "torchscript":  # asked for explicitly: its highest opset
            opset = min(opset, TORCHSCRIPT_MAX_OPSET)
    exporter = exporter or plan_exporter
    if exporter == "torchscript" and opset > TORCHSCRIPT_MAX_OPSET:
        exporter = "dynamo"  # the TorchScript exporter stops at opset 20

    net = model
    if any(p.device.type != "cpu" for p in model.parameters()):
        import copy

        net = copy.deepcopy(model).cpu()
    was_training = net.training
    net.eval()
    final = Layout(root).export_dir(key)
    try:
        with replaced_dir(final) as tmp:   # a reader sees the old export or the new one, never a mix
            spec = graph_spec(entry, net, config)
            spec.module.eval()
            model_path = tmp / "model.onnx"
            try:
                _export_graph(spec, model_path, exporter, opset)
            except Exception as e:
                raise ExportError(f"{key}: the {exporter} ONNX exporter failed at opset {opset} "
                                  f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]})") from e
            kill_point("export")   # model.onnx written, the rest of the export not
            graphs = {"model": (spec, model_path)}
            for name, comp in spec.companions.items():
                comp.module.eval()
                graphs[name] = (comp, tmp / f"{name}.onnx")
                try:
                    _export_graph(comp, graphs[name][1], exporter, opset)
                except Exception as e:
                    raise ExportError(f"{key}: the {exporter} ONNX exporter failed on the {name} graph at opset "
                                      f"{opset} ({type(e).__name__}: "
                                      f"{(str(e).strip().splitlines() or [''])[0][:300]})") from e
            try:
                for _, path in graphs.values():
                    file_opset = check_onnx(path)
            except Exception as e:
                raise ExportError(f"{key}: exported graph fails onnx.checker "
                                  f"({(str(e).strip().splitlines() or [''])[0][:300]})") from e
            inputs, outputs = _io(model_path)
            companion_io = {}
            for name, (_, path) in graphs.items():
                if name != "model":
                    companion_io[f"{name}_inputs"], companion_io[f"{name}_outputs"] = _io(path)
            parity = check_parity(spec, net, model_path, export_cfg)
            seconds = time.perf_counter() - t0
            parity.update(opset=file_opset, exporter=exporter, seconds=seconds)

            import onnx
            import onnxruntime

            engine_config = {
                "format": EXPORT_FORMAT, "key": key, "family": config.get("family") or entry.family_name,
                "backbone": entry.name,
                "graph": kind, "kind": spec.info.pop("kind", "image"),
                "files": {"model": "model.onnx"}, "inputs": inputs, "outputs": outputs,
                "opset": file_opset, "exporter": exporter,
                "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                             "onnxruntime": onnxruntime.__version__},
                **spec.info, **companion_io,
                "spec": ModelSpec.from_config(config, key).to_json(),   # the checkpoint's model spec
            }
            _write_json(tmp / "config.json", engine_config)
            _write_json(tmp / "parity.json", parity)
    except Exception as e:
        if disk_full(e):   # the exporter's own message drops the path
            raise ExportError(f"no space left on device writing the export of {key} to {final.parent} (nothing "
                              "half-written left, the previous export kept); free space there and rerun") from e
        raise
    finally:
        net.train(was_training)
    status = "passed" if parity["passed"] else f"FAILED: {parity['reason']}"
    print(f"{key}: exported to {final / 'model.onnx'} ({exporter}, opset {file_opset}, {seconds:.1f}s); "
          f"parity max abs {parity['max_abs']:.2e}, max rel {parity['max_rel']:.2e}: {status}", flush=True)
    return {**parity, "path": str(final)}
