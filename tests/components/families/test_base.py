"""The Family contract and the backbone registry: every family implements it, every dispatch asks
the registry, and a new backbone trains and exports with one network class and one registry entry."""
import dataclasses

import pytest
import torch

from components.config import (
    DatasetConfig,
    DiffusionConfig,
    EvalConfig,
    ModelConfig,
    Params,
    SampleConfig,
    TrainConfig,
    UNetConfig,
    load_params,
)
from components.errors import ConfigError
from components.families import base

CONTRACT = ("check", "model_config", "training_data", "build_network", "loss_fn", "flops_per_item",
            "probe_step", "evaluate", "load_model", "train")


@pytest.mark.parametrize("name", sorted(base.BACKBONES))
def test_every_family_implements_the_contract(name):
    fam = base.backbone(name).family()
    missing = [f for f in CONTRACT if not callable(getattr(fam, f, None))]
    assert not missing, f"components.families.{base.backbone(name).module} lacks {missing}"
    assert fam.train is base.train   # one training entry for every family


def test_registry_entries_are_consistent(project_root):
    for b in base.BACKBONES.values():
        assert b.section in base.NETWORK_SECTIONS and set(b.reads) <= set(base.NETWORK_SECTIONS)
        assert dataclasses.is_dataclass(base.shape_config_class(b))
        assert b.graph in ("denoiser", "sr_denoiser", "causal_lm", "masked_lm", "encoder_decoder", "text_denoiser")
        assert b.exporter in ("torchscript", "dynamo")
        for rel in b.code_paths:   # a renamed file would silently drop out of the inputs hash
            assert (project_root / rel).exists(), rel
    params = load_params(project_root / "params.yaml")
    for key, m in params.models.items():   # every default model names a registered backbone of its family
        assert base.backbone(m.backbone).family_name == m.family, key


def test_unknown_backbone_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"^models.x.backbone: unknown backbone 'rnn'; known: unet, dit"):
        base.backbone("rnn", "models.x.backbone")


# ---------------------------------------------------------------------------
# Adding a backbone: a network class + one registry entry (README "Adding a model")
# ---------------------------------------------------------------------------

class TinyDenoiser(torch.nn.Module):
    """A two-convolution denoiser with the diffusion family's signature: (x, t, y) -> eps."""

    def __init__(self, cfg: UNetConfig, image_size: int, in_channels: int, num_classes: int):
        super().__init__()
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        width = cfg.channels[0]
        self.time = torch.nn.Linear(1, width)
        self.label = torch.nn.Embedding(num_classes + 1, width)   # + the null class of guidance
        self.conv_in = torch.nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(width, in_channels, 3, padding=1)

    def forward(self, x, t, y):
        cond = self.time(t.float()[:, None] / 100) + self.label(y)              # (B, width)
        return self.conv_out(torch.relu(self.conv_in(x) + cond[:, :, None, None]))


def test_a_new_backbone_trains_and_exports_with_one_registry_entry(digits_root, monkeypatch):
    from components.config import ExportConfig
    from components.export import export_model
    from flows import stages

    entry = base.Backbone("tinyconv", "diffusion", "diffusion", ("image",), "denoising",
                          f"{__name__}:TinyDenoiser", reads=("unet", "diffusion"), graph="denoiser",
                          exporter="torchscript")
    monkeypatch.setitem(base.BACKBONES, "tinyconv", entry)
    model = ModelConfig(family="diffusion", backbone="tinyconv", dataset="digits",
                        unet=UNetConfig(channels=[8]), diffusion=DiffusionConfig(timesteps=10),
                        train=TrainConfig(max_steps=3, max_seconds=0, batch_size=8, warmup_steps=1, threads=1),
                        sample=SampleConfig(steps=5), eval=EvalConfig(num_samples=10, sampler_sweep=["ddim5"]))
    params = Params(datasets={"digits": DatasetConfig(source="builtin:digits")}, models={"tiny-conv": model})

    metrics = stages.train(params, "tiny-conv", digits_root)
    assert metrics["perf/train_steps"] == 3 and metrics["perf/peak_rss_train_mb"] > 0
    net, config = base.family_of(params, "tiny-conv").load_model("tiny-conv", digits_root)
    assert isinstance(net, TinyDenoiser) and config["backbone"] == "tinyconv"
    result = export_model("tiny-conv", net, config, ExportConfig(), digits_root)
    assert result["passed"], result.get("reason")
    assert entry.unused_sections == ("dit", "gpt", "encdec", "textenc", "cross_attention", "masked", "condition")
