"""train.device / train.precision: the rule (every branch, GPU ones included, from given facts),
the real torch call, and the training loop on a GPU where there is one."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components import training
from components.config import TrainConfig
from components.device import Placement, cpu_state, decide, resolve, to_device
from components.errors import ConfigError

NO_GPU = dict(cuda_available=False, cuda_count=0, bf16_supported=False)
ONE_BF16_GPU = dict(cuda_available=True, cuda_count=1, bf16_supported=True)
ONE_OLD_GPU = dict(cuda_available=True, cuda_count=1, bf16_supported=False)
WHERE = "models.digits-unet.train"


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_auto_is_the_cpu_in_fp32_without_a_gpu():
    assert decide("auto", "auto", **NO_GPU) == Placement("cpu", "fp32")


def test_auto_is_the_gpu_in_bf16_when_it_has_bf16_else_fp32():
    assert decide("auto", "auto", **ONE_BF16_GPU) == Placement("cuda:0", "bf16")
    assert decide("auto", "auto", **ONE_OLD_GPU) == Placement("cuda:0", "fp32")
    assert decide("cuda", "fp16", **ONE_OLD_GPU) == Placement("cuda:0", "fp16")
    assert decide("cuda:1", "fp32", cuda_available=True, cuda_count=2, bf16_supported=True) == \
        Placement("cuda:1", "fp32")
    assert decide("cpu", "auto", **ONE_BF16_GPU) == Placement("cpu", "fp32")


def test_cuda_without_a_gpu_is_one_line_naming_the_key():
    with pytest.raises(ConfigError) as e:
        decide("cuda", "auto", where=WHERE, **NO_GPU)
    msg = one_line(e)
    assert msg.startswith(f"{WHERE}.device: 'cuda'") and "no CUDA GPU" in msg and "use auto or cpu" in msg


def test_a_gpu_index_past_the_last_gpu_is_refused():
    with pytest.raises(ConfigError) as e:
        decide("cuda:3", "auto", where=WHERE, cuda_available=True, cuda_count=2, bf16_supported=True)
    msg = one_line(e)
    assert msg.startswith(f"{WHERE}.device: 'cuda:3'") and "2 CUDA GPU(s)" in msg and "cuda:0..cuda:1" in msg


def test_fp16_on_the_cpu_is_refused():
    with pytest.raises(ConfigError) as e:
        decide("cpu", "fp16", where=WHERE, **ONE_BF16_GPU)
    msg = one_line(e)
    assert msg.startswith(f"{WHERE}.precision: fp16 on the CPU") and "use fp32 or auto" in msg


def test_bf16_on_a_gpu_without_it_and_on_the_cpu_is_refused():
    with pytest.raises(ConfigError) as e:
        decide("cuda", "bf16", where=WHERE, **ONE_OLD_GPU)
    assert one_line(e).startswith(f"{WHERE}.precision: bf16, but cuda:0 does not support bfloat16")
    with pytest.raises(ConfigError) as e:
        decide("auto", "bf16", where=WHERE, **NO_GPU)
    assert one_line(e).startswith(f"{WHERE}.precision: bf16 on the CPU")


@pytest.mark.parametrize("device,precision,key", [("gpu", "auto", "device"), ("cuda:x", "auto", "device"),
                                                  ("cpu", "fp64", "precision")])
def test_unknown_values_are_refused_with_what_to_use(device, precision, key):
    with pytest.raises(ConfigError) as e:
        decide(device, precision, where=WHERE, **ONE_BF16_GPU)
    msg = one_line(e)
    assert msg.startswith(f"{WHERE}.{key}: ") and "use one of auto" in msg


def test_resolve_asks_torch():
    placed = resolve("auto", "auto", where=WHERE)
    if torch.cuda.is_available():
        assert placed.is_cuda
    else:
        assert placed == Placement("cpu", "fp32") and placed.device == torch.device("cpu")
        assert placed.autocast_dtype is None
        with pytest.raises(ConfigError, match=rf"^{WHERE}\.device: 'cuda', but torch sees no CUDA GPU"):
            resolve("cuda", "auto", where=WHERE)


def test_the_cpu_leaves_batches_and_states_as_they_are():
    batch = (torch.ones(2), [torch.zeros(1)], {"y": torch.arange(3)})
    assert to_device(batch, torch.device("cpu")) is batch
    state = torch.nn.Linear(2, 2).state_dict()
    out = cpu_state(state)
    assert out.keys() == state.keys() and all(out[k] is state[k] for k in state)
    assert out._metadata == state._metadata


def test_training_refuses_an_impossible_device_before_a_step(tmp_path: Path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: train.device cuda is possible here")
    cfg = TrainConfig(max_steps=1, max_seconds=0, device="cuda")
    net = torch.nn.Linear(2, 1)
    with pytest.raises(ConfigError, match=r"^models\.tiny\.train\.device: 'cuda'"):
        training.train(net, lambda step, gen: torch.ones(4, 2), lambda m, b, g: m(b).sum(), cfg, tmp_path,
                       items_per_batch=4, name="tiny")
    assert not (tmp_path / "ckpt").exists()


def _tiny_train(tmp_path: Path, **train):
    cfg = TrainConfig(max_steps=6, max_seconds=0, warmup_steps=1, ema_decay=0.9, checkpoint_every=0, log_every=0,
                      seed=1, threads=1, **train)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    data = torch.randn(64, 4)

    def get_batch(step, gen):
        return data[torch.randint(64, (8,), generator=gen)]

    def loss_fn(model, x, gen):
        noise = torch.randn(x.shape, generator=gen, device=x.device)
        return ((model(x + noise) - x) ** 2).mean()
    return training.train(net, get_batch, loss_fn, cfg, tmp_path, items_per_batch=8)


def test_cpu_fp32_is_recorded_and_checkpoints_hold_cpu_tensors(tmp_path: Path):
    model, result = _tiny_train(tmp_path, device="cpu", precision="fp32")
    assert (result.device, result.precision) == ("cpu", "fp32")
    ckpt = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert (ckpt["device"], ckpt["precision"]) == ("cpu", "fp32")
    schedule = (tmp_path / training.SCHEDULE_NAME).read_text()
    assert '"device": "cpu"' in schedule and '"precision": "fp32"' in schedule


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_the_gpu_keeps_fp32_weights_and_cpu_checkpoints(tmp_path: Path, precision: str):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    model, result = _tiny_train(tmp_path, device="cuda", precision=precision)
    assert result.device == "cuda:0" and result.precision == precision
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in model.parameters())
    ckpt = torch.load(tmp_path / "ckpt" / "last.pt", map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ckpt["ema"].values())
    assert (ckpt["device"], ckpt["precision"]) == ("cuda:0", precision)
    assert ("scaler" in ckpt) == (precision == "fp16")
