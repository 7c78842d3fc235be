"""What a comparison is made of: model runs, the pipeline run, the machine, rows and the report.

Also the essay's claims and the verdict words: every other module of the package reads them here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from components.errors import ConfigError, GenflowError
from components.families.registry import Backbone, backbone


class CompareError(GenflowError, ValueError):
    """The comparison cannot be built from what MLflow holds; the message says which run and why."""


# Every finished model run must carry these (older genflow runs lack some: refuse, never half a report).
REQUIRED_METRICS = ("perf/params", "perf/train_seconds", "perf/train_items_per_s", "perf/flops_per_item",
                    "perf/sample_ms_per_item", "train/loss")
MAIN_METRIC = {"image": "eval/fd", "captions": "eval/fd", "text": "eval/bits_per_char",
               "pairs": "eval/bits_per_char"}
IMAGE_KINDS = ("image", "captions")       # dataset kinds whose items are images (captions: prompted images)

AGREES, DISAGREES, MIXED, NOT_MEASURED = "agrees", "disagrees", "mixed", "not measured"
# A metric the data cannot have (class accuracy on unlabelled images): shown as "n/a" with the reason.
NOT_APPLICABLE = "n/a"
NOT_APPLICABLE_TAG = "genflow.not_applicable"   # optional run tag: JSON {metric: reason}
BASELINE_NAMES = {"real": "real data", "kde": "KDE", "gaussian": "Gaussian"}

# The essay's words, quoted (Table 1, or its strengths/weaknesses lists where Table 1 has no row).
CLAIMS: dict[str, tuple[str, str]] = {
    "Generation quality": ("high, very realistic", "high, coherent"),
    "Sampling speed": ("slow, iterative process", "relatively fast, parallel processing"),
    "Computational cost": ("high, long training times", "high for large models, but efficient for inference"),
    "Parameters and memory": ("(no claim)", "large models: high computational demands and memory requirements"),
    "Parallel processing": ("limited", "excellent, inherent to the architecture"),
    "Training stability": ("generally stable, less prone to mode collapse",
                           "generally stable, but mode collapse can occur"),
    "Memorisation": ("robust generalization capabilities", "(no claim)"),
    # the seed's architecture section: an encoder-decoder for sequence transduction; here against
    # the decoder-only transformer on the same pairs (no diffusion model transduces)
    "Architecture (transduction)": ("(no claim)", "encoder-decoder: encoder stack, decoder with cross-attention, "
                                                  "for sequence transduction"),
    # the seed's applications and strengths lists: diffusion's versatility, editing in particular
    "Editing (inpainting, super-resolution)": ("versatile: effective in image editing tasks such as inpainting "
                                               "and super-resolution", "(no claim)"),
    # the seed's applications and architecture sections: text-to-image, conditioned by cross-attention
    "Text-to-image (prompt adherence)": ("the usual choice for text-to-image: a U-Net with cross-attention to "
                                         "an encoded prompt", "an encoder-decoder: the decoder writes the image "
                                                              "with cross-attention to the encoded prompt"),
}
NOT_MEASURED_ROWS = ("Data Type Focus", "Long-Range Dependencies", "Interpretability", "Primary Applications")


def known_backbone(name: str) -> Optional[Backbone]:
    """The registry entry of a run's backbone tag; None for a tag this genflow no longer knows (old runs)."""
    try:
        return backbone(name)
    except ConfigError:
        return None


@dataclass
class ModelResult:
    key: str
    family: str                       # diffusion | transformer
    backbone: str                     # unet | dit | gpt | mdlm (components.families.base.BACKBONES)
    dataset: str
    kind: str                         # image | captions | text | pairs
    run_id: str
    metrics: dict[str, float]
    params: dict[str, str] = field(default_factory=dict)
    experiment_id: str = ""
    note: str = ""                    # e.g. "skipped in this run; version 3 (run ...)"
    seeds: list[dict[str, float]] = field(default_factory=list)   # one per seed: seed, train/loss, main metric
    seeds_source: str = ""            # "mlflow" (runs found) or "retrained" (--seeds)
    scaling: dict[int, float] = field(default_factory=dict)       # threads -> training items/s (live probe)
    not_applicable: dict[str, str] = field(default_factory=dict)  # metric (or short name) -> why it has none

    def param(self, name: str, default: Any = None, cast=float) -> Any:
        try:
            return cast(self.params[name])
        except (KeyError, ValueError, TypeError):
            return default

    @property
    def generation(self) -> str:
        """How it samples: denoising | autoregressive | masked (an unknown backbone: by its family)."""
        entry = known_backbone(self.backbone)
        if entry:
            return entry.generation
        return "autoregressive" if self.family == "transformer" else "denoising"

    @property
    def is_image(self) -> bool:
        """Its items are images (of a plain or a captioned dataset)."""
        return self.kind in IMAGE_KINDS

    @property
    def main_metric(self) -> str:
        return MAIN_METRIC[self.kind]

    @property
    def unit(self) -> str:
        """What one generated item is: an image, or a character of text."""
        return "image" if self.is_image else "char"

    @property
    def tokens_per_item(self) -> int:
        """Tokens per generated item for a GPT (channel values of an image: H * W * C; 1 for a character)."""
        if self.is_image:
            return int(self.param("dataset.image_size", 8)) ** 2 * self.param("dataset.channels", 1, cast=int)
        return 1

    def get(self, name: str) -> Optional[float]:
        v = self.metrics.get(name)
        return v if v is not None and math.isfinite(v) else None

    def not_applicable_reason(self, name: str) -> Optional[str]:
        """Why metric `name` cannot exist for this run (None: it does, or it is merely missing).

        From not_applicable (a key matches the full name, its short name, or a suffix of it: "class_acc"
        covers eval/class_acc, baseline/real_class_acc, eval/sr_class_acc), else inferred: an image run
        with the real-data floor but no baseline/real_class_acc was scored without classes
        (components/evaluation/images.py leaves class accuracy out for unlabelled data).
        """
        if self.get(name) is not None:
            return None
        short = name.split("/", 1)[-1]
        for key, why in self.not_applicable.items():
            k = key.split("/", 1)[-1]
            if key == name or short == k or short.endswith("_" + k):
                return why
        if (short.endswith("class_acc") and self.is_image and self.get("baseline/real_fd") is not None
                and self.get("baseline/real_class_acc") is None):
            from components.evaluation.images import UNLABELLED

            return UNLABELLED
        return None


@dataclass
class Pipeline:
    run_ids: dict[str, str]           # dataset -> parent run id
    flow_run_id: str
    started: str                      # parent run's start, local time
    models: list[ModelResult]
    notes: list[str] = field(default_factory=list)

    def datasets(self) -> list[str]:
        return sorted({m.dataset for m in self.models})

    def models_of(self, dataset: str) -> list[ModelResult]:
        """The models of one dataset, diffusion first (side by side in every table)."""
        return sorted((m for m in self.models if m.dataset == dataset), key=lambda m: (m.family != "diffusion", m.key))


@dataclass
class Machine:
    cores: int
    cpu: str
    peak_gflops: float                # fp32 matmul, all cores
    peak_gflops_1thread: float = float("nan")
    torch: str = ""

    @property
    def best_peak(self) -> float:
        """The higher of the two: on a busy machine the all-core figure can come out below one core's."""
        return max(v for v in (self.peak_gflops, self.peak_gflops_1thread, 0.0) if math.isfinite(v))


@dataclass
class Row:
    dataset: str
    feature: str
    cells: dict[str, str]             # model key -> what was measured, in words and numbers
    verdict: str
    evidence: str                     # the numbers behind the verdict, one sentence
    notes: dict[str, str] = field(default_factory=dict)   # model key -> why its cell's "n/a" has no number


@dataclass
class Report:
    pipeline: Pipeline
    machine: Machine
    rows: list[Row]
    plots: dict[str, bytes] = field(default_factory=dict)   # file name -> PNG
    created: str = ""
