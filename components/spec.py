"""The model spec: one typed description of a trained model, from params to checkpoint to export.

    spec = ModelSpec(model="digits-unet", backbone="unet", dataset="digits", kind="image",
                     network={...UNetConfig fields...}, process={...DiffusionConfig fields...}, ...)
    config = spec.to_config()            # the plain dict saved in models/<key>/model.pt
    spec = ModelSpec.from_config(config) # typed again: export, evaluation and the engines read it

The family modules build it (components/families/*.model_config), components/export.py reads it
to trace the graph and writes it into exports/<key>/config.json ("spec"), so the checkpoint and
the export carry the same description. ``from_config`` is the one place that reads older or
hand-written dicts (keys under a "data" section, no "family" or "kind"). Torch-free.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from components.errors import ModelError
from components.families.registry import backbone as registry_entry

PROCESS_SECTIONS = ("diffusion", "masked")   # the generative process's settings, by section name


@dataclass(frozen=True)
class ModelSpec:
    model: str                       # the model key (registered model name)
    backbone: str                    # a name in components/families/registry.py
    dataset: str
    kind: str                        # image | text | pairs
    network: dict = field(default_factory=dict)   # the backbone's shape section (unet, dit or gpt)
    process: dict = field(default_factory=dict)   # diffusion or masked section, if the backbone reads one
    sample: dict = field(default_factory=dict)    # sampling defaults (sampler, steps, guidance, ...)
    condition: dict = field(default_factory=dict)  # what a conditioned denoiser also reads (unet-sr: lowres)
    family: str = ""                 # diffusion | transformer (from the registry when empty)
    # images
    image_size: int = 0
    channels: int = 1
    levels: int = 0                  # grey levels the pixels are quantised to
    classes: tuple[str, ...] = ()
    num_classes: int = 0             # len(classes) unless given
    class_prior: tuple[float, ...] = ()
    # tokens
    vocab: Optional[str] = None      # characters of the tokenizer (text)
    vocab_size: int = 0
    mask_id: Optional[int] = None    # the masked LM's [MASK] id

    def __post_init__(self):
        entry = registry_entry(self.backbone, f"models/{self.model}: spec backbone")
        if not self.family:
            object.__setattr__(self, "family", entry.family_name)
        if not self.num_classes and self.classes:
            object.__setattr__(self, "num_classes", len(self.classes))
        if self.kind not in ("image", "text", "pairs"):
            raise ModelError(f"models/{self.model}: spec kind {self.kind!r} is not image, text or pairs")

    @property
    def section(self) -> str:
        """The params section the network's shape comes from (unet, dit, gpt)."""
        return registry_entry(self.backbone).section

    @property
    def process_section(self) -> Optional[str]:
        return next((s for s in registry_entry(self.backbone).reads if s in PROCESS_SECTIONS), None)

    def to_config(self) -> dict[str, Any]:
        """The plain JSON dict saved with the weights (and read back by from_config)."""
        out: dict[str, Any] = {"family": self.family, "backbone": self.backbone, "model": self.model,
                               "dataset": self.dataset, "kind": self.kind, self.section: dict(self.network)}
        if self.process_section:
            out[self.process_section] = dict(self.process)
        if self.sample:
            out["sample"] = dict(self.sample)
        if self.condition:
            out["condition"] = dict(self.condition)
        if self.kind == "image":
            out.update(num_classes=self.num_classes, classes=list(self.classes), image_size=self.image_size,
                       channels=self.channels, levels=self.levels)
            if self.class_prior:
                out["class_prior"] = list(self.class_prior)
        if self.vocab is not None:
            out["vocab"] = self.vocab
        if self.vocab_size:
            out["vocab_size"] = self.vocab_size
        if self.mask_id is not None:
            out["mask_id"] = self.mask_id
        return out

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], model: str = "") -> "ModelSpec":
        """A spec from a model.pt config dict (today's, or an older/hand-written one)."""
        if not isinstance(config, Mapping) or not config.get("backbone"):
            raise ModelError(f"models/{model or '?'}: the model's config names no backbone; retrain it")
        entry = registry_entry(config["backbone"], f"models/{model or config.get('model', '?')}: config.backbone")

        def find(key: str, default: Any = None) -> Any:   # top level first, then legacy sub-sections
            for node in (config, config.get("data"), config.get("dataset")):
                if isinstance(node, Mapping) and node.get(key) is not None:
                    return node[key]
            return default

        kind = config.get("kind") or ("text" if config.get("vocab") else "image")
        classes = find("classes") or ()
        process = next((config[s] for s in PROCESS_SECTIONS if s in entry.reads and isinstance(config.get(s), Mapping)),
                       {})
        dataset = config.get("dataset")
        return cls(model=model or str(config.get("model") or config.get("key") or ""), backbone=entry.name,
                   dataset=dataset if isinstance(dataset, str) else "", kind=kind,
                   network=dict(config.get(entry.section) or {}), process=dict(process),
                   sample=dict(config.get("sample") or {}), condition=dict(config.get("condition") or {}),
                   family=str(config.get("family") or ""),
                   image_size=int(find("image_size", 0) or 0), channels=int(find("channels", 1) or 1),
                   levels=int(find("levels", 0) or 0), classes=tuple(str(c) for c in classes),
                   num_classes=int(find("num_classes", 0) or len(classes)),
                   class_prior=tuple(float(p) for p in (config.get("class_prior") or ())),
                   vocab=config.get("vocab"), vocab_size=int(config.get("vocab_size") or 0),
                   mask_id=None if config.get("mask_id") is None else int(config["mask_id"]))
