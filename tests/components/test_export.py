"""ONNX export: checked graphs, named dynamic axes, the parity gate and what it refuses."""
import json

import numpy as np
import onnx
import pytest
import torch

from components.config import ExportConfig, GPTConfig, UNetConfig
from components.export import ExportError, check_parity, export_model, graph_spec
from components.inference import InferenceError, load_engine
from components.models.diffusion import make_alphas_cumprod
from components.models.gpt import GPT
from components.models.unet import UNet

UNET_CONFIG = {"backbone": "unet", "family": "diffusion", "image_size": 8, "levels": 17, "num_classes": 3,
               "diffusion": {"timesteps": 20, "schedule": "cosine"},
               "sample": {"sampler": "ddim", "steps": 10, "eta": 0.0, "guidance": 2.0}}
TEXT_CONFIG = {"backbone": "gpt", "family": "transformer", "kind": "text", "vocab": "abcdefghij"}


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(UNetConfig(channels=[8, 16], time_dim=16, groups=4), image_size=8, in_channels=1, num_classes=3)
    for p in net.parameters():  # zero-initialised output layers would make parity trivially exact
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


def tiny_gpt(vocab_size: int = 11, block_size: int = 16, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=block_size), vocab_size).eval()


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_unet_export_is_a_checked_graph_with_a_dynamic_batch_and_passes_parity(tmp_path):
    result = export_model("tiny-unet", tiny_unet(), UNET_CONFIG, ExportConfig(), tmp_path)
    folder = tmp_path / "exports" / "tiny-unet"
    assert result["passed"] and result["max_abs"] <= 1e-4 and "reason" not in result
    assert result["exporter"] == "torchscript" and result["opset"] == 20
    assert {c["name"] for c in result["checks"]} == {"batch=1", "batch=3", "batch=16"}
    assert result["max_abs"] == max(c["max_abs"] for c in result["checks"])

    model = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["x", "t", "y"] and model.graph.output[0].name == "eps"
    assert dims(model.graph.input[0])[0] == "batch" and dims(model.graph.input[0])[1:] == [1, 8, 8]
    assert model.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64

    config = json.loads((folder / "config.json").read_text())
    assert config["graph"] == "denoiser" and config["backbone"] == "unet" and config["opset"] == 20
    assert config["num_classes"] == 3 and config["levels"] == 17 and config["timesteps"] == 20
    np.testing.assert_allclose(config["alphas_cumprod"], make_alphas_cumprod(20, "cosine"), rtol=1e-12)
    assert config["sample"] == UNET_CONFIG["sample"]
    parity = json.loads((folder / "parity.json").read_text())
    assert parity["passed"] is True and parity["max_abs"] == result["max_abs"]
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["tiny-unet"]  # no temp folder left


def test_gpt_export_serves_prefill_and_decode_and_matches_pytorch_generation(tmp_path):
    net = tiny_gpt()
    result = export_model("tiny-gpt", net, TEXT_CONFIG, ExportConfig(), tmp_path)
    assert result["passed"], result.get("reason")
    assert result["exporter"] == "dynamo" and result["opset"] == 23
    names = [c["name"] for c in result["checks"]]
    assert any(n.startswith("no cache") for n in names) and any(n.startswith("cache") for n in names)
    assert {c["output"] for c in result["checks"]} == {"logits", "present_kv"}

    model = onnx.load(str(tmp_path / "exports" / "tiny-gpt" / "model.onnx"))
    assert "Attention" in {n.op_type for n in model.graph.node}  # opset 23's fused attention
    assert dims(model.graph.input[0]) == ["batch", "seq"] and dims(model.graph.input[1])[4] == "past"

    # the whole cached loop (prefill, decode, sliding window past block_size) gives PyTorch's greedy tokens
    engine = load_engine(tmp_path / "exports" / "tiny-gpt", threads=1)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    ours = engine.generate(prompt, 30, temperature=1.0, top_k=1)
    theirs = net.generate(torch.from_numpy(prompt), 30, temperature=1.0, top_k=1)
    assert ours.shape == (2, 33) and np.array_equal(ours, theirs.numpy())


def test_a_torchscript_export_of_an_image_gpt_records_its_token_layout(tmp_path):
    config = {"backbone": "gpt", "family": "transformer", "kind": "image", "levels": 5, "num_classes": 3,
              "image_size": 4}
    result = export_model("tiny-digits-gpt", tiny_gpt(vocab_size=8, block_size=17), config, ExportConfig(),
                          tmp_path, exporter="torchscript")
    assert result["passed"] and result["exporter"] == "torchscript" and result["opset"] == 20
    saved = json.loads((tmp_path / "exports" / "tiny-digits-gpt" / "config.json").read_text())
    assert (saved["kind"], saved["class_token_offset"], saved["pixel_token_offset"]) == ("image", 5, 0)
    assert (saved["n_layer"], saved["n_head"], saved["head_dim"], saved["block_size"]) == (2, 2, 8, 17)


def test_perturbed_onnx_initializers_fail_the_gate(tmp_path):
    net = tiny_unet()
    export_model("tiny-unet", net, UNET_CONFIG, ExportConfig(), tmp_path)
    path = tmp_path / "exports" / "tiny-unet" / "model.onnx"
    model = onnx.load(str(path))
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = onnx.numpy_helper.to_array(weight) + np.float32(0.05)
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(path))

    result = check_parity(graph_spec("unet", net, UNET_CONFIG), net, path, ExportConfig())
    assert not result["passed"] and result["max_abs"] > 1e-3
    assert "above export.parity_atol 0.0001" in result["reason"] and "\n" not in result["reason"]


def test_a_model_changed_after_export_fails_the_gate_without_raising(tmp_path, monkeypatch):
    import components.export as export

    net = tiny_gpt()
    original = export._export_graph

    def export_then_perturb(spec, path, exporter, opset):
        original(spec, path, exporter, opset)
        with torch.no_grad():
            w = net.transformer.h[0].attn.c_attn.weight  # the reference is no longer the graph
            w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))

    monkeypatch.setattr(export, "_export_graph", export_then_perturb)
    result = export_model("tiny-gpt", net, TEXT_CONFIG, ExportConfig(), tmp_path, exporter="torchscript")
    assert result["passed"] is False and result["reason"].startswith("max abs error")
    parity = json.loads((tmp_path / "exports" / "tiny-gpt" / "parity.json").read_text())
    assert parity["passed"] is False and parity["reason"] == result["reason"]
    with pytest.raises(InferenceError, match="failed its parity check"):  # the engine refuses it too
        load_engine(tmp_path / "exports" / "tiny-gpt")


def test_a_tight_relative_tolerance_is_applied_too(tmp_path):
    result = export_model("tiny-unet", tiny_unet(), UNET_CONFIG, ExportConfig(parity_rtol=1e-12), tmp_path)
    assert not result["passed"] and "export.parity_rtol" in result["reason"]


def test_re_export_replaces_the_whole_folder(tmp_path):
    export_model("tiny-unet", tiny_unet(), UNET_CONFIG, ExportConfig(), tmp_path)
    stale = tmp_path / "exports" / "tiny-unet" / "decode.onnx"
    stale.write_text("from an older export")
    export_model("tiny-unet", tiny_unet(seed=1), UNET_CONFIG, ExportConfig(), tmp_path)
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["tiny-unet"]


def test_unknown_backbone_and_missing_schedule_are_refused_in_one_line(tmp_path):
    with pytest.raises(ExportError, match=r"^config.backbone: 'rnn' has no ONNX export; known: unet"):
        export_model("m", tiny_unet(), {**UNET_CONFIG, "backbone": "rnn"}, ExportConfig(), tmp_path)
    config = {k: v for k, v in UNET_CONFIG.items() if k != "diffusion"}
    with pytest.raises(ExportError, match=r"^config.diffusion.timesteps: missing"):
        export_model("m", tiny_unet(), config, ExportConfig(), tmp_path)
    assert list((tmp_path / "exports").iterdir()) == []  # nothing half-written


# ---------------------------------------------------------------------------
# The hybrids: a DiT through the denoiser graph, a masked diffusion LM through masked_lm
# ---------------------------------------------------------------------------

def tiny_dit(seed: int = 0):
    from components.config import DiTConfig
    from components.models.dit import DiT

    torch.manual_seed(seed)
    net = DiT(DiTConfig(patch_size=2, width=16, depth=2, heads=2, mlp_ratio=2.0), image_size=8, in_channels=1,
              num_classes=3)
    for p in net.parameters():  # adaLN-Zero would make parity trivially exact
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


def tiny_mdlm(seed: int = 0, block_size: int = 16):
    from components.models.mdlm import MaskedLM

    torch.manual_seed(seed)
    net = MaskedLM(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=block_size), 12)  # 10 chars, unk, [MASK]
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


MDLM_CONFIG = {"backbone": "mdlm", "family": "diffusion", "kind": "text", "vocab": "abcdefghij", "mask_id": 11,
               "sample": {"steps": 4, "length": 10, "prompt": "ab", "temperature": 1.0, "top_k": 0}}


def test_dit_exports_through_the_denoiser_graph_with_a_dynamic_batch_and_passes_parity(tmp_path):
    dit_config = {**UNET_CONFIG, "backbone": "dit"}
    net = tiny_dit()
    result = export_model("tiny-dit", net, dit_config, ExportConfig(), tmp_path)
    assert result["passed"], result.get("reason")
    assert result["exporter"] == "torchscript" and result["opset"] == 20
    assert max(c["ref_max"] for c in result["checks"]) > 0.1      # a real comparison, not zeros against zeros
    folder = tmp_path / "exports" / "tiny-dit"
    model = onnx.load(str(folder / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["x", "t", "y"] and model.graph.output[0].name == "eps"
    assert dims(model.graph.input[0]) == ["batch", 1, 8, 8]
    config = json.loads((folder / "config.json").read_text())
    assert (config["graph"], config["backbone"], config["family"]) == ("denoiser", "dit", "diffusion")
    assert (config["image_size"], config["channels"], config["num_classes"], config["null_class"]) == (8, 1, 3, 3)
    # the engine samples it exactly like the U-Net: same images as the PyTorch process from the same noise
    from components.models.diffusion import GaussianDiffusion

    engine = load_engine(folder, threads=1)
    y = torch.tensor([0, 2, 1])
    ref = GaussianDiffusion(20, "cosine", 3).sample(net, y, (1, 8, 8), steps=5, guidance=2.0,
                                                    generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    ours = engine.sample(y.numpy(), sampler="ddim", steps=5, eta=0.0, guidance=2.0,
                         randn=lambda shape: torch.randn(shape, generator=gen).numpy())
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4)


def test_dit_without_image_size_anywhere_is_refused_in_one_line(tmp_path):
    net = tiny_dit()
    net.image_size = None  # neither on the network nor in the config
    config = {k: v for k, v in UNET_CONFIG.items() if k != "image_size"}
    with pytest.raises(ExportError, match=r"^config.image_size / num_classes: missing"):
        export_model("m", net, {**config, "backbone": "dit"}, ExportConfig(), tmp_path)


def test_mdlm_exports_a_masked_lm_graph_with_dynamic_batch_and_length(tmp_path):
    result = export_model("tiny-mdlm", tiny_mdlm(), MDLM_CONFIG, ExportConfig(), tmp_path)
    assert result["passed"], result.get("reason")
    assert result["exporter"] == "dynamo" and result["opset"] == 23
    assert {c["output"] for c in result["checks"]} == {"logits"} and len(result["checks"]) == 3
    assert max(c["ref_max"] for c in result["checks"]) > 0.1
    folder = tmp_path / "exports" / "tiny-mdlm"
    model = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input_ids"] and model.graph.output[0].name == "logits"
    assert dims(model.graph.input[0]) == ["batch", "seq"] and dims(model.graph.output[0]) == ["batch", "seq", 11]
    config = json.loads((folder / "config.json").read_text())
    assert (config["graph"], config["backbone"], config["kind"]) == ("masked_lm", "mdlm", "text")
    assert (config["vocab_size"], config["mask_id"], config["block_size"]) == (12, 11, 16)
    assert config["sample"]["steps"] == 4 and config["vocab"] == "abcdefghij"
