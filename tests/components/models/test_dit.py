"""DiT: adaLN-Zero starts as the identity, zero output at init, patches, the U-Net's call, the family."""
from pathlib import Path

import numpy as np
import pytest
import torch

from components import data
from components.config import (
    DatasetConfig,
    DiffusionConfig,
    DiTConfig,
    EvalConfig,
    ModelConfig,
    Params,
    SampleConfig,
    TrainConfig,
)
from components.models.diffusion import GaussianDiffusion
from components.models.dit import DiT, DiT_configs, DiTBlock, DiTConfigError, count_params, modulate

ROOT = Path(__file__).resolve().parents[3]
TINY = DiTConfig(patch_size=2, width=16, depth=2, heads=2, mlp_ratio=2.0)


def tiny_dit(seed: int = 0, **kw) -> DiT:
    torch.manual_seed(seed)
    return DiT(kw.pop("config", TINY), image_size=kw.pop("image_size", 8), in_channels=kw.pop("in_channels", 1),
               num_classes=kw.pop("num_classes", 3))


def test_modulate_shifts_and_scales_per_sample():
    x = torch.ones(2, 3, 4)
    out = modulate(x, shift=torch.tensor([[1.0] * 4, [0.0] * 4]), scale=torch.tensor([[0.0] * 4, [1.0] * 4]))
    assert torch.equal(out[0], torch.full((3, 4), 2.0)) and torch.equal(out[1], torch.full((3, 4), 2.0))


def test_adaln_zero_blocks_start_as_the_identity():
    torch.manual_seed(0)
    block = DiTBlock(16, 2, mlp_ratio=2.0)
    x, c = torch.randn(3, 5, 16), torch.randn(3, 16)
    assert torch.equal(block(x, c), x)
    # the gates are the only reason: with a non-zero modulation the block changes its input
    torch.nn.init.normal_(block.adaLN_modulation[-1].weight)
    assert not torch.allclose(block(x, c), x)


def test_output_is_zero_at_init_with_the_unet_signature_and_shape():
    net = tiny_dit()
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 5, 9, 3])
    y = torch.tensor([0, 1, 2, 3])                     # 3 = num_classes: the null class
    eps = net(x, t, y)
    assert eps.shape == x.shape and eps.dtype == torch.float32
    assert torch.count_nonzero(eps) == 0
    assert net.image_size == 8 and net.in_channels == 1 and net.num_classes == 3   # what the export reads
    rgb = tiny_dit(config=DiTConfig(patch_size=4, width=16, depth=1, heads=4), image_size=16, in_channels=3)
    assert rgb(torch.randn(2, 3, 16, 16), t[:2], y[:2]).shape == (2, 3, 16, 16)


def test_one_training_step_moves_the_output_off_zero():
    net = tiny_dit()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    process = GaussianDiffusion(timesteps=10, num_classes=3)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    y = torch.arange(8) % 3
    loss = process.training_loss(net, x0, y, torch.Generator().manual_seed(0))
    loss.backward()
    assert net.final_layer.linear.weight.grad.abs().sum() > 0   # zero init does not block learning
    opt.step()
    assert net(x0, torch.zeros(8, dtype=torch.long), y).abs().sum() > 0


def test_patchify_cuts_raster_order_patches_and_unpatchify_inverts_it():
    net = tiny_dit(config=DiTConfig(patch_size=2, width=16, depth=1, heads=2), in_channels=3)
    x = torch.randn(2, 3, 8, 8)
    patches = net.patchify(x)                                     # (B, 16, 2*2*3)
    assert patches.shape == (2, 16, 12)
    # token 5 = row 1, column 1 of the 4x4 grid of patches; pixels in (row, col, channel) order
    assert torch.equal(patches[:, 5].reshape(2, 2, 2, 3), x[:, :, 2:4, 2:4].permute(0, 2, 3, 1))
    assert torch.equal(net.unpatchify(patches), x)


def test_patch_tokens_follow_the_same_order_as_the_patch_embedding():
    """The output of token i lands where the input patch i came from (a wrong order would scramble images)."""
    net = tiny_dit(config=DiTConfig(patch_size=2, width=16, depth=1, heads=2))
    x = torch.zeros(1, 1, 8, 8)
    x[..., 2:4, 6:8] = 1.0                                        # patch (1, 3): token 7
    tokens = net.x_embedder(x).flatten(2).transpose(1, 2)[0]     # (16, D)
    changed = (tokens - net.x_embedder.bias).abs().sum(1) > 0
    assert changed.nonzero().flatten().tolist() == [7]
    assert net.patchify(x)[0].abs().sum(1).nonzero().flatten().tolist() == [7]


def test_sampling_runs_through_the_gaussian_process_unchanged():
    net = tiny_dit().eval()
    process = GaussianDiffusion(timesteps=10, num_classes=3)
    x = process.sample(net, torch.tensor([0, 2]), (1, 8, 8), steps=4, guidance=2.0,
                       generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


@pytest.mark.parametrize("cfg, size, field", [
    (DiTConfig(patch_size=3), 8, "dit.patch_size"),
    (DiTConfig(patch_size=0), 8, "dit.patch_size"),
    (DiTConfig(width=30, heads=3), 8, "dit.width"),
    (DiTConfig(width=32, heads=3), 8, "dit.heads"),
    (DiTConfig(depth=0), 8, "dit.depth"),
])
def test_bad_shapes_are_refused_in_one_line_naming_the_field(cfg, size, field):
    with pytest.raises(DiTConfigError) as e:
        DiT(cfg, image_size=size, in_channels=1, num_classes=10)
    assert isinstance(e.value, ValueError) and str(e.value).startswith(field + ":") and "\n" not in str(e.value)


def test_named_sizes_and_the_digits_config_stay_near_the_unet():
    from components.config import load_params

    digits = load_params(ROOT / "params.yaml").models["digits-dit"]
    assert digits.backbone == "dit" and digits.family == "diffusion" and digits.enabled is False
    assert digits.dit == DiT_configs["DiT-S/2"]
    n = count_params(DiT(digits.dit, image_size=8, in_channels=1, num_classes=10))
    assert 400_000 < n < 800_000          # digits-unet: 648k parameters


# ---------------------------------------------------------------------------
# Through the diffusion family (the same module as digits-unet)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit-digits")
    cfg = DatasetConfig(source="builtin:digits", kind="image", image_size=8, levels=17)
    data.ingest("digits", cfg, root)
    data.prepare("digits", cfg, root)
    return root


def test_the_diffusion_family_trains_loads_and_evaluates_a_dit(digits_root):
    from components.families import diffusion as fam

    model = ModelConfig(family="diffusion", backbone="dit", dataset="digits", dit=TINY,
                        diffusion=DiffusionConfig(timesteps=10, p_uncond=0.2),
                        train=TrainConfig(max_steps=3, max_seconds=0, batch_size=8, warmup_steps=1, log_every=1,
                                          checkpoint_every=0, threads=1),
                        sample=SampleConfig(sampler="ddim", steps=4, guidance=2.0),
                        eval=EvalConfig(num_samples=20, sampler_sweep=["ddim2"]))
    params = Params(datasets={"digits": DatasetConfig(source="builtin:digits")}, models={"tiny-dit": model})
    metrics = fam.train("tiny-dit", params, digits_root)
    assert metrics["perf/train_steps"] == 3 and np.isfinite(metrics["train/loss"])
    net, config = fam.load_model("tiny-dit", digits_root)
    assert isinstance(net, DiT) and config["backbone"] == "dit" and config["dit"]["width"] == 16
    out = fam.evaluate("tiny-dit", params, digits_root)
    assert np.isfinite(out["eval/fd"]) and "eval/fd_ddim2" in out

    bad = Params(datasets=params.datasets, models={"tiny-dit": ModelConfig(
        family="diffusion", backbone="dit", dataset="digits", dit=DiTConfig(patch_size=3), train=model.train)})
    with pytest.raises(DiTConfigError, match=r"^dit.patch_size: 3 does not divide image_size 8"):
        fam.train("tiny-dit", bad, digits_root)
