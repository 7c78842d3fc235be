"""The one registry of backbones: every place that must know something about a backbone asks it.

    entry = backbone("unet")          # a Backbone: family, data kinds, export plan, code files ...
    fam = entry.family()              # the family module (components/families/<module>.py), on demand

Adding a backbone = one network file in components/models/ + one entry in BACKBONES (+ a family
module only when no existing one can train it); README "Adding a model" walks through it. This
module imports nothing heavy and nothing of genflow's but its errors: components/config.py checks
params against it, the CLI and the torch-free sampler use it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from components.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from components.config import Params

ATTENTION_MIN_OPSET = 23            # opset of ONNX's fused Attention op (attention models export at >= this)

# Sections of a model's params.yaml entry that belong to one backbone or process; a model's run
# logs only those its backbone reads (so runs compared in the MLflow UI show settings that mattered).
NETWORK_SECTIONS = ("unet", "dit", "gpt", "encdec", "textenc", "cross_attention", "diffusion", "masked", "condition")

# Code every model's result depends on, whatever its backbone.
SHARED_CODE = ("components/training.py", "components/families/base.py", "components/families/registry.py",
               "components/spec.py", "components/evaluation/images.py", "components/evaluation/text.py",
               "components/export.py", "components/sampling/__init__.py", "components/sampling/requests.py")
DENOISING_CODE = ("components/models/diffusion.py", "components/sampling/diffusion.py")


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Backbone:
    """One network genflow can train, and everything the platform must know about it."""
    name: str                 # the params.yaml value: models.<key>.backbone
    family_name: str          # models.<key>.family must say this: diffusion | transformer
    module: str               # components.families.<module> trains and evaluates it
    data_kinds: tuple[str, ...]  # dataset kinds it accepts: image, text, pairs
    generation: str           # denoising (steps x all positions) | autoregressive (one token a call) |
    #                           masked (K calls write a whole sequence) | transduction (encode once, then
    #                           autoregressive decoding)
    network: str              # "components.models.unet:UNet"
    reads: tuple[str, ...]    # params sections it reads (of NETWORK_SECTIONS); the first holds the network's shape
    graph: str                # ONNX graph kind: denoiser | sr_denoiser | causal_lm | masked_lm | encoder_decoder
    exporter: str             # torchscript | dynamo
    min_opset: int = 0        # the export's opset is max(export.opset, min_opset)
    code: tuple[str, ...] = field(default=())   # its own source files (the family's are added)

    def family(self) -> Any:
        """The family module (components.families.<module>): imports torch."""
        return importlib.import_module(f"components.families.{self.module}")

    @property
    def unused_sections(self) -> tuple[str, ...]:
        return tuple(s for s in NETWORK_SECTIONS if s not in self.reads)

    @property
    def code_paths(self) -> list[str]:
        """Source files whose change means a model of this backbone must be retrained."""
        own = [f"components/families/{self.module}.py", self.network.split(":")[0].replace(".", "/") + ".py"]
        return sorted(set(own) | set(self.code) | set(SHARED_CODE))

    @property
    def network_class(self) -> str:
        return self.network.split(":")[1]

    @property
    def section(self) -> str:
        """The params section holding the network's shape (models.<key>.<section>)."""
        return self.reads[0]

    def network_class_object(self) -> Any:
        """The torch.nn.Module class (imports the model file, hence torch)."""
        module, cls = self.network.split(":")
        return getattr(importlib.import_module(module), cls)



BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("unet", "diffusion", "diffusion", ("image",), "denoising", "components.models.unet:UNet",
             reads=("unet", "diffusion"), graph="denoiser", exporter="torchscript", code=DENOISING_CODE),
    Backbone("dit", "diffusion", "diffusion", ("image",), "denoising", "components.models.dit:DiT",
             reads=("dit", "diffusion"), graph="denoiser", exporter="torchscript", code=DENOISING_CODE),
    Backbone("unet-sr", "diffusion", "superres", ("image",), "denoising", "components.models.srunet:SuperResUNet",
             reads=("unet", "diffusion", "condition"), graph="sr_denoiser", exporter="torchscript",
             code=DENOISING_CODE + ("components/models/unet.py", "components/families/diffusion.py",
                                    "components/sampling/superres.py", "components/evaluation/superres.py")),
    Backbone("gpt", "transformer", "transformer", ("image", "text", "pairs"), "autoregressive",
             "components.models.gpt:GPT", reads=("gpt",), graph="causal_lm", exporter="dynamo",
             min_opset=ATTENTION_MIN_OPSET, code=("components/tokenizer.py",)),
    Backbone("mdlm", "diffusion", "mdlm", ("text",), "masked", "components.models.mdlm:MaskedLM",
             reads=("gpt", "masked"), graph="masked_lm", exporter="dynamo", min_opset=ATTENTION_MIN_OPSET,
             code=("components/models/gpt.py", "components/tokenizer.py", "components/sampling/masked.py")),
    Backbone("encdec", "transformer", "seq2seq", ("pairs",), "transduction", "components.models.encdec:EncDec",
             reads=("encdec",), graph="encoder_decoder", exporter="torchscript",
             code=("components/models/gpt.py", "components/tokenizer.py", "components/evaluation/seq2seq.py")),
    Backbone("unet-text", "diffusion", "captions", ("captions",), "denoising", "components.models.unet_text:TextUNet",
             reads=("unet", "textenc", "cross_attention", "diffusion"), graph="text_denoiser", exporter="torchscript",
             code=DENOISING_CODE + ("components/models/unet.py", "components/models/textenc.py",
                                    "components/models/encdec.py", "components/models/gpt.py",
                                    "components/families/diffusion.py", "components/tokenizer.py",
                                    "components/captions.py")),
    # the encoder-decoder above on captioned images: prompt characters in, grey levels out (raster order)
    Backbone("encdec-pixels", "transformer", "captions_encdec", ("captions",), "transduction",
             "components.models.encdec:EncDec", reads=("encdec",), graph="encoder_decoder", exporter="torchscript",
             code=("components/models/gpt.py", "components/tokenizer.py", "components/captions.py",
                   "components/families/captions.py", "components/families/diffusion.py",
                   "components/families/seq2seq.py")),
)}


def backbone(name: str, where: Optional[str] = None) -> Backbone:
    """The registry entry for a backbone name; ConfigError naming `where` (a params key) if unknown."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"{where or 'backbone'}: unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None


def backbone_of_class(class_name: str) -> Optional[Backbone]:
    """The entry whose network class is `class_name` (UNet, DiT, GPT, MaskedLM), else None."""
    return next((b for b in BACKBONES.values() if b.network_class == class_name), None)


def family_of(params: "Params", key: str) -> Any:
    """The family module that trains and evaluates model `key` of params."""
    return backbone(params.model(key).backbone, f"models.{key}.backbone").family()
