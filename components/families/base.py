"""The Family contract: what every family module implements, and the one training entry they share.

A *backbone* is the network a model key names in params.yaml (``backbone: unet``), registered in
components/families/registry.py (re-exported here); a *family* is the module that turns a dataset
into batches and a loss for it, evaluates it and describes it for export
(components/families/<module>.py):

    entry = backbone("unet")          # the registry entry: family, data kinds, export plan, code files
    fam = entry.family()              # the family module, imported on demand (torch inside)
    fam.build_network(config)         # a fresh network for a model spec
    train("digits-unet", params, root)   # the one training entry, for every family

Importing this module is cheap (torch and the data code are imported inside the functions).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

from components.families.registry import (  # noqa: F401  (the registry, re-exported)
    ATTENTION_MIN_OPSET,
    BACKBONES,
    NETWORK_SECTIONS,
    SHARED_CODE,
    Backbone,
    backbone,
    backbone_of_class,
    family_of,
)

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    from components.config import ModelConfig, Params


# ---------------------------------------------------------------------------
# What a family module implements
# ---------------------------------------------------------------------------

class Batches(Protocol):
    """What a family hands the training loop: a batch per step, drawn from the step's generator."""
    items_per_batch: int                      # images or tokens per global batch (perf/train_items_per_s)

    def __call__(self, step: int, gen: Any) -> Any: ...


class Family(Protocol):
    """The functions a module in components/families/ provides (diffusion.py, transformer.py, mdlm.py).

    config is the model spec: the plain dict saved in model.pt and the export's config.json.
    """

    def check(self, key: str, mc: "ModelConfig") -> None:
        """Refuse bad settings in one line (ConfigError/ModelError) before any data is read."""

    def model_config(self, key: str, mc: "ModelConfig", manifest: dict, root: "Path") -> dict:
        """The model spec: everything needed to rebuild the network and run it (JSON-able)."""

    def training_data(self, key: str, mc: "ModelConfig", config: dict, root: "Path") -> tuple[Callable, int]:
        """(get_batch(step, gen) -> batch, items per batch) over the prepared train split."""

    def build_network(self, config: dict) -> Any:
        """A freshly initialised torch.nn.Module for a model spec (torch's global RNG seeds it)."""

    def loss_fn(self, config: dict) -> Callable[[Any, Any, Any], Any]:
        """loss(model, batch, gen) -> scalar tensor; all randomness drawn from gen."""

    def flops_per_item(self, net: Any, config: dict) -> float:
        """Training FLOPs (forward + backward) per item (image or token)."""

    def probe_step(self, net: Any, config: dict, batch_size: int, gen: Any) -> tuple[Callable[[], Any], int]:
        """(loss() on random data of the model's shape, items per step): the resource probes' step."""

    def evaluate(self, key: str, params: "Params", root: "Path") -> dict[str, float]:
        """Score the trained model; write reports/<key>/; return eval/ perf/ baseline/ metrics."""


# ---------------------------------------------------------------------------
# The one training entry every family uses
# ---------------------------------------------------------------------------

def train(key: str, params: "Params", root: "Path") -> dict[str, float]:
    """Train params.models[key] on its prepared dataset; write models/<key>/model.pt (EMA weights if
    on, and the model spec) and train_metrics.json; return its train/ and perf/ metrics.

    The same for every family: settings checked first, torchrun when train.processes > 1, the seed
    set before the network is built, peak memory measured, only rank 0 writes.
    """
    import os
    from pathlib import Path

    import torch

    from components import data, distributed, training
    from components.config import hash_json
    from components.errors import ModelError
    from components.files import atomic_file, write_json
    from components.layout import Layout
    from components.resources import mfu, peak_flops, peak_rss

    lay = Layout(Path(root))
    mc = params.model(key)
    entry = backbone(mc.backbone, f"models.{key}.backbone")
    fam = entry.family()
    fam.check(key, mc)
    training.placement(mc.train, key)   # a device or precision this machine lacks: one line, now
    if distributed.should_launch(mc.train.processes):   # train.processes > 1: rerun under torchrun
        return distributed.launch_params(key, params, lay.root)
    manifest = data.load_manifest(mc.dataset, lay.root)
    if manifest.get("kind") not in entry.data_kinds:
        raise ModelError(f"models.{key}.dataset: {mc.dataset} holds {manifest.get('kind')} data; a {entry.name} "
                         f"model needs {' or '.join(entry.data_kinds)}")
    config = fam.model_config(key, mc, manifest, lay.root)
    get_batch, items_per_batch = fam.training_data(key, mc, config, lay.root)

    torch.manual_seed(mc.train.seed)  # the initial weights are part of the run's seed
    net = fam.build_network(config)
    loss_fn = fam.loss_fn(config)
    fingerprint = hash_json([manifest.get("files", {}), config])  # resume only onto the same data and model
    with peak_rss() as mem:  # resident memory while training (perf/peak_rss_train_mb)
        model, result = training.train(net, get_batch, loss_fn, mc.train, lay.model_dir(key),
                                       items_per_batch=items_per_batch, name=key, fingerprint=fingerprint)
    if not distributed.is_main_process():   # several processes: rank 0 writes the model and metrics
        return {}

    model.cpu(), net.cpu()   # model.pt holds fp32 CPU weights (export and evaluation read them there)
    with atomic_file(lay.model_file(key)) as tmp:
        torch.save({"state_dict": model.state_dict(), "config": config}, tmp)
    metrics = {"train/loss": result.final_loss,
               "perf/train_seconds": result.seconds,
               "perf/train_items_per_s": result.items_per_s,   # images or tokens per second
               "perf/train_steps": float(result.steps),
               "perf/params": float(sum(p.numel() for p in net.parameters())),
               "perf/flops_per_item": fam.flops_per_item(net, config),   # forward + backward
               "perf/peak_rss_train_mb": mem.peak_mb,
               "perf/peak_rss_train_delta_mb": mem.delta_mb}
    # the matmul peak under the thread policy training used (this process's threads and OpenMP wait
    # policy), times the processes that trained together (each with its own threads or GPU)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    metrics["perf/peak_flops"] = peak_flops(lay.root, torch.get_num_threads(), result.device,
                                            result.precision) * processes
    metrics["perf/mfu"] = mfu(metrics, metrics["perf/peak_flops"])
    write_json(lay.model_dir(key) / "train_metrics.json", metrics)
    return metrics


def shape_config_class(entry: Backbone) -> type:
    """The dataclass of a backbone's shape section: the type of ModelConfig.<section> (components/config.py)."""
    import typing

    from components.config import ModelConfig

    return typing.get_type_hints(ModelConfig)[entry.section]


def read_model_file(key: str, root: "Path", error: type[Exception], backbones: tuple[str, ...] = ()) -> dict:
    """models/<key>/model.pt as {"state_dict", "config"}; `error` with one line when it is missing
    or (with `backbones`) holds another kind of network."""
    import torch

    from components.layout import Layout

    path = Layout(root).model_file(key)
    if not path.exists():
        raise error(f"models/{key}/model.pt: not found; run `genflow stage train {key}` first")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    found = ckpt.get("config", {}).get("backbone")
    if backbones and found not in backbones:
        want = " or ".join(backbones)
        article = "an" if want[0] in "aeiou" else "a"
        raise error(f"models/{key}/model.pt: holds a {found!r} model, not {article} {want}; "
                    f"retrain it with `genflow stage train {key}`")
    return ckpt


def load_model(key: str, root: "Path", error: type[Exception], backbones: tuple[str, ...] = ()) -> tuple[Any, dict]:
    """(network with the trained weights in eval mode, its model spec) from models/<key>/model.pt."""
    ckpt = read_model_file(key, root, error, backbones)
    config = ckpt["config"]
    net = backbone(config.get("backbone"), f"models/{key}/model.pt config.backbone").family().build_network(config)
    try:
        net.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise error(f"models/{key}/model.pt: its weights do not fit this version's network (written by an older "
                    f"genflow); retrain it: genflow stage train {key}") from None
    return net.eval(), config


def device_of(net: Any) -> Any:
    """The device a network's parameters are on (the CPU for one without parameters)."""
    import torch

    param = next(iter(net.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def probe_train_step(net: Any, config: dict, batch_size: int, lr: float = 1e-4) -> tuple[Callable[[], None], int]:
    """One optimiser step of the model's own training loss on random data: (step(), items per step).

    `config` is the model spec saved with the weights. Items are images for image diffusion and
    tokens for the GPT and the masked language model, as in perf/train_items_per_s. The data are
    random: only the cost of a step is of interest (components.resources times it).
    """
    import torch

    fam = backbone(config.get("backbone"), "config.backbone").family()
    gen = torch.Generator(device=device_of(net)).manual_seed(0)   # random data made where the model is
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    loss, items = fam.probe_step(net, config, batch_size, gen)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
    return step, items
