"""Rebuild a registered model version from its lineage and say whether it came out the same.

    verdict = reproduce("digits-unet@champion", root)    # genflow reproduce digits-unet@champion

A version's lineage (tags written when it was trained) names everything that made it: the git
commit of the code, the DVC hash of its prepared data, the params it ran with (the run's
``lineage/params.yaml``), the learning rate of every step and the thread count
(``checkpoint/schedule.json``), and the versions of torch, numpy and onnxruntime. Reproducing:

1. check the pieces exist: the commit is in this repository, the tree was clean, the data hash
   is recorded (one clear line each when not);
2. check the commit out into a temporary git worktree (the user's tree is never touched);
3. restore the prepared data by its DVC hash from the configured DVC remote, in a scratch DVC
   repository (so the data really comes from the remote, not from a local cache);
4. train, evaluate and export in the worktree, with that commit's code, the recorded params and
   threads, replaying the recorded schedule (so a wall-clock budget stops at the same step);
5. compare with the registered version: every ONNX weight (max absolute difference), the
   primary metric and the parity figure; the verdict goes to the version's tags
   (``genflow.reproduce.*``) and to a run of its own. Aliases are never changed.

Everything temporary lives under one folder that is removed at the end, failure or not.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import yaml

from components import registry
from components.config import Params, ParamsError, load_params
from components.errors import ModelError
from components.layout import Layout
from components.tracking import PARAMS_ARTIFACT, ensure_experiment, experiment_name

IDENTICAL, WITHIN, DIFFERENT = "identical", "equal within tolerance", "different"
SCHEDULE_ARTIFACT = "checkpoint/schedule.json"
LIBRARIES = ("torch", "numpy", "onnxruntime")
TAG = "genflow.reproduce."


class ReproduceError(ModelError):
    """A version cannot be reproduced; the message names the missing piece and what to do."""


@dataclass
class Verdict:
    model: str
    version: str
    verdict: str
    weights_max_abs: float
    worst_weights: list[tuple[str, float]]        # the tensors that differ most (name, max abs diff)
    metric: str
    registered_metric: Optional[float]
    reproduced_metric: Optional[float]
    registered_parity: Optional[float]
    reproduced_parity: Optional[float]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    run_id: str = ""

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------

def _float(text: Any) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise ReproduceError(f"git {' '.join(args)} in {root} failed: {r.stderr.strip().splitlines()[-1:]}")
    return r


def library_warnings(tags: Mapping[str, str]) -> list[str]:
    """One line per library whose installed version differs from the one that trained the version."""
    import importlib.metadata

    out = []
    for lib in LIBRARIES:
        then = tags.get(f"genflow.version.{lib}")
        names = ("onnxruntime", "onnxruntime-gpu") if lib == "onnxruntime" else (lib,)
        now = "not installed"
        for name in names:
            try:
                now = importlib.metadata.version(name)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        if then and then != now:
            out.append(f"{lib} {now} is installed, the version was trained with {then}: "
                       "the weights may differ by float rounding")
    return out


def check_lineage(key: str, version: str, tags: Mapping[str, str], root: Path) -> tuple[str, str, str]:
    """(commit, dataset, data hash) of a version, or ReproduceError naming the missing piece."""
    where = f"{key}:{version}"
    commit = tags.get("genflow.git_commit", "unknown")
    if commit in ("", "unknown"):
        raise ReproduceError(f"{where}: its lineage has no git commit (trained outside a git repository); "
                             "it cannot be rebuilt from code")
    if tags.get("genflow.git_dirty") == "true":
        files = tags.get("genflow.git_dirty_files") or "unknown files"
        raise ReproduceError(f"{where}: trained from a tree with uncommitted changes ({files}) on top of "
                             f"{commit[:12]}; that code is in no commit, so the version cannot be rebuilt")
    if _git(root, "cat-file", "-e", f"{commit}^{{commit}}", check=False).returncode != 0:
        raise ReproduceError(f"{where}: git commit {commit[:12]} is not in the repository at {root}; "
                             "fetch it (git fetch --all) or reproduce from a clone that has it")
    dataset = tags.get("genflow.dataset", "")
    data_hash = tags.get(f"genflow.data_hash.{dataset}.prepared") or tags.get(f"genflow.data_hash.{dataset}", "")
    if not dataset or not data_hash.endswith(".dir"):
        raise ReproduceError(f"{where}: its lineage has no DVC hash for the prepared data of "
                             f"{dataset or 'its dataset'} (trained outside a DVC repository?)")
    return commit, dataset, data_hash


def weight_diff(a_path: Path, b_path: Path) -> tuple[float, list[tuple[str, float]]]:
    """Max abs difference over every initializer of two ONNX graphs, and the worst three tensors.

    inf when the graphs do not hold the same tensors (names or shapes)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    def weights(path: Path) -> dict[str, np.ndarray]:
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}

    a, b = weights(a_path), weights(b_path)
    if a.keys() != b.keys():
        odd = sorted(a.keys() ^ b.keys())[:3]
        return math.inf, [(n, math.inf) for n in odd]
    diffs = []
    for name in a:
        if a[name].shape != b[name].shape:
            diffs.append((name, math.inf))
        elif a[name].size:
            d = np.abs(a[name].astype(np.float64) - b[name].astype(np.float64)).max()
            diffs.append((name, float(d)))
    diffs.sort(key=lambda x: -x[1])
    return (diffs[0][1] if diffs else 0.0), [d for d in diffs[:3] if d[1] > 0]


def judge(weights_max_abs: float, registered: Optional[float], reproduced: Optional[float],
          atol: float, rtol: float, *, same_device: bool = True, device_rtol: float = 0.05) -> str:
    """identical: every weight bit-equal and the same metric; within tolerance: weights within
    atol and the metric within rtol (relative); else different.

    Rebuilt on another kind of device (same_device False: CPU vs GPU kernels round differently
    and the difference grows over training), the weights cannot be expected to agree: within
    tolerance then means the metric within device_rtol."""
    same_metric = registered == reproduced or (registered is not None and reproduced is not None
                                               and math.isnan(registered) and math.isnan(reproduced))
    if weights_max_abs == 0 and same_metric:
        return IDENTICAL

    def close(tol: float) -> bool:
        return (registered is not None and reproduced is not None
                and abs(registered - reproduced) <= tol * max(abs(registered), 1e-12))
    if weights_max_abs <= atol and (same_metric or close(rtol)):
        return WITHIN
    if not same_device and (same_metric or close(device_rtol)):
        return WITHIN
    return DIFFERENT


def rebuild_placement(tags: Mapping[str, str], gpu_here: bool) -> tuple[str, str, Optional[str]]:
    """(train.device, train.precision, warning or None) for rebuilding a version here: its recorded
    device and precision when this machine has that kind of device, else the CPU in fp32 with a
    line saying that the comparison is then within tolerance, not bit for bit."""
    then, precision = tags.get("genflow.device", "cpu"), tags.get("genflow.precision", "fp32")
    if not then.startswith("cuda"):
        return "cpu", precision, None
    if gpu_here:
        return "cuda", precision, None
    return "cpu", "fp32", (f"the version was trained on {then} in {precision}, this machine has no GPU: it is rebuilt "
                           "on the CPU in fp32 and compared within tolerance (the metric), not bit for bit")


# ---------------------------------------------------------------------------
# Restoring code and data
# ---------------------------------------------------------------------------

@contextmanager
def worktree(root: Path, commit: str, parent: Path) -> Iterator[Path]:
    """A detached git worktree of `commit` under `parent`; removed (and pruned) afterwards."""
    path = parent / "src"
    _git(root, "worktree", "add", "--detach", "--quiet", str(path), commit)
    try:
        yield path
    finally:
        _git(root, "worktree", "remove", "--force", str(path), check=False)
        _git(root, "worktree", "prune", check=False)


def remote_config(root: Path, params: Params) -> tuple[str, dict]:
    """(name, settings) of the DVC remote that `genflow run` pushes to (storage.dvc_remote or DVC's default)."""
    from dvc.repo import Repo

    try:
        repo = Repo(str(root))
    except Exception as e:  # NotDvcRepoError and friends
        raise ReproduceError(f"{root}: not a DVC repository ({e}); reproduce restores data from its DVC remote") \
            from None
    try:
        remotes = {name: dict(conf) for name, conf in repo.config.get("remote", {}).items()}
        wanted = params.storage.dvc_remote or repo.config.get("core", {}).get("remote", "")
    finally:
        repo.close()
    if wanted in remotes:
        return wanted, remotes[wanted]
    if wanted:  # a folder or URL given in params
        url = wanted if "://" in wanted else str((Path(root) / wanted).resolve())
        return "params", {"url": url}
    raise ReproduceError(f"{root}: no DVC remote configured (storage.dvc_remote in params.yaml or "
                         "`dvc remote add -d NAME URL`); the data cannot be restored")


def restore_data(data_hash: str, dest: Path, remote: tuple[str, dict], scratch: Path) -> None:
    """Pull the directory with DVC hash `data_hash` from the remote into `dest` (via a scratch repo)."""
    from dvc.repo import Repo

    name, conf = remote
    scratch.mkdir(parents=True)
    repo = Repo.init(str(scratch), no_scm=True)
    try:
        with repo.config.edit("repo") as c:
            c["core"]["remote"] = "origin"
            c["core"]["analytics"] = False
            c["remote"]["origin"] = {k: v for k, v in conf.items()}
        (scratch / "data.dvc").write_text(yaml.safe_dump(
            {"outs": [{"md5": data_hash, "hash": "md5", "path": "data"}]}))
        try:
            repo.pull(targets=[str(scratch / "data.dvc")])
        except Exception as e:  # DVC's errors name hashes, not what the user did
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ReproduceError(f"data {data_hash}: not restorable from DVC remote {name!r} "
                                 f"({conf.get('url', '?')}): {first}; the remote no longer holds it "
                                 "(was it garbage-collected?)") from None
    finally:
        repo.close()
    if not (scratch / "data").is_dir():
        raise ReproduceError(f"data {data_hash}: DVC remote {name!r} ({conf.get('url', '?')}) "
                             "returned nothing; the remote no longer holds it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(scratch / "data"), dest)


# ---------------------------------------------------------------------------
# The whole thing
# ---------------------------------------------------------------------------

def _download(client: Any, run_id: str, path: str, dst: Path) -> Optional[Path]:
    from mlflow.exceptions import MlflowException

    try:
        return Path(client.download_artifacts(run_id, path, str(dst)))
    except (MlflowException, OSError):
        return None


def _run_stage(src: Path, stage: str, key: str, env: dict) -> None:
    """`genflow stage STAGE KEY` with the worktree's own code; its output goes to ours."""
    print(f"[reproduce] {stage} {key} (code of the version's commit)", flush=True)
    r = subprocess.run([sys.executable, "-m", "flows.cli", "stage", stage, key], cwd=src, env=env)
    if r.returncode != 0:
        raise ReproduceError(f"{stage} {key} failed in the worktree of the version's commit "
                             f"(exit {r.returncode}); its output is above")


def reproduce(spec: str, root: Path, params: Optional[Params] = None, *, atol: float = 1e-6,
              rtol: float = 1e-4, device_rtol: float = 0.05, keep: Optional[Path] = None) -> Verdict:
    """Rebuild MODEL[@alias|:version] from its lineage and compare it with the registered one."""
    from components.registry.resolve import parse_model_spec

    t0 = time.perf_counter()
    root = Path(root).resolve()
    params = params or load_params(root / "params.yaml")
    key, alias, number = parse_model_spec(spec)
    client = registry.registry_client(root, params)
    mv = registry.get_version(client, key, number or alias)
    version, tags = str(mv.version), dict(mv.tags)
    aliases_before = registry.current_aliases(client, key)
    commit, dataset, data_hash = check_lineage(key, version, tags, root)
    same_device = True
    warnings = library_warnings(tags)
    for w in warnings:
        print(f"[reproduce] warning: {w}", flush=True)
    remote = remote_config(root, params)

    tmp = Path(tempfile.mkdtemp(prefix=f"genflow-reproduce-{key}-"))
    try:
        with worktree(root, commit, tmp) as src:
            print(f"[reproduce] {key}:{version}: commit {commit[:12]} checked out in {src}", flush=True)
            # the params the version ran with; versions without the record use the commit's params.yaml
            recorded = _download(client, mv.run_id, PARAMS_ARTIFACT, tmp / "lineage")
            if recorded is not None:
                raw = yaml.safe_load(recorded.read_text())
            else:
                raw = yaml.safe_load((src / "params.yaml").read_text())
                try:
                    then = load_params(src / "params.yaml").section_hash("models", key)
                except ParamsError as e:
                    raise ReproduceError(f"{key}:{version}: no params record and the commit's params.yaml "
                                         f"does not load ({e})") from None
                if then != tags.get("genflow.params_hash"):
                    raise ReproduceError(f"{key}:{version}: no params record, and params.yaml at "
                                         f"{commit[:12]} is not what it trained with (params hash {then} vs "
                                         f"{tags.get('genflow.params_hash')})")
            schedule = _download(client, mv.run_id, SCHEDULE_ARTIFACT, tmp / "schedule")
            threads = int(_float(tags.get("genflow.train_threads")) or 0)
            if threads:  # the same intra-op threads: reductions split the same way
                raw["models"][key].setdefault("train", {})["threads"] = threads
            if "genflow.device" in tags:   # the version's code knows train.device: rebuild where it trained
                import torch

                device, precision, moved = rebuild_placement(tags, torch.cuda.is_available())
                raw["models"][key].setdefault("train", {}).update({"device": device, "precision": precision})
                if moved:
                    same_device = False
                    warnings.append(moved)
                    print(f"[reproduce] warning: {moved}", flush=True)
            if schedule is None and float(raw["models"][key].get("train", {}).get("max_seconds", 0) or 0) > 0:
                warnings.append("no recorded schedule and a wall-clock budget: training may stop at another step")
            (src / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

            print(f"[reproduce] restoring {dataset} ({data_hash}) from DVC remote {remote[0]!r}", flush=True)
            built = Layout(src)
            restore_data(data_hash, built.prepared_dir(dataset), remote, tmp / "dvc")

            env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
            env.update({"PYTHONPATH": str(src), "OMP_WAIT_POLICY": "PASSIVE",
                        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'scratch.db'}"})  # never the user's store
            if schedule is not None:
                env["GENFLOW_REPLAY_SCHEDULE"] = str(schedule)
            for stage in ("train", "evaluate", "export"):
                _run_stage(src, stage, key, env)

            from components.registry.resolve import download_version

            reg_folder = download_version(key, None, version, root, tmp / "registered")
            w_max, worst = weight_diff(reg_folder / "model.onnx", built.export_dir(key) / "model.onnx")
            rule = registry.promotion_rule(params, key)
            new_metrics = json.loads((built.report_dir(key) / "metrics.json").read_text())
            new_parity = json.loads((built.export_dir(key) / "parity.json").read_text())
            reg_metric = _float(tags.get(registry.METRIC_TAG + rule.metric))
            new_metric = _float(new_metrics.get(rule.metric))
            if keep is not None:  # what was rebuilt, for a closer look
                keep.mkdir(parents=True, exist_ok=True)
                for made in (built.model_dir(key), built.report_dir(key), built.export_dir(key)):
                    if made.is_dir():
                        shutil.copytree(made, keep / made.relative_to(src), dirs_exist_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    verdict = judge(w_max, reg_metric, new_metric, atol, rtol, same_device=same_device, device_rtol=device_rtol)
    result = Verdict(model=key, version=version, verdict=verdict,
                     weights_max_abs=w_max, worst_weights=worst, metric=rule.metric,
                     registered_metric=reg_metric, reproduced_metric=new_metric,
                     registered_parity=_float(tags.get("genflow.parity_max_abs")),
                     reproduced_parity=_float(new_parity.get("max_abs")), warnings=warnings,
                     seconds=time.perf_counter() - t0)
    record(client, result, root, experiment_name(params, dataset), dataset, tags, atol, rtol)
    if registry.current_aliases(client, key) != aliases_before:  # reproduce never moves one; say so if someone did
        print(f"[reproduce] note: the aliases of {key} changed while reproducing (not by reproduce)", flush=True)
    return result


def record(client: Any, v: Verdict, root: Path, experiment: str, dataset: str,
           tags: Mapping[str, str], atol: float, rtol: float) -> None:
    """The verdict as a run of its own (in the model's experiment) and as tags of the version."""
    exp_id = ensure_experiment(client, experiment, client.tracking_uri, root)
    run_tags = {"mlflow.runName": f"reproduce {v.model}:{v.version}", "genflow.reproduce_of": f"{v.model}:{v.version}",
                "genflow.model_key": v.model, "genflow.dataset": dataset, TAG + "verdict": v.verdict,
                "genflow.git_commit": tags.get("genflow.git_commit", "unknown")}
    run = client.create_run(exp_id, tags=run_tags)
    rid = v.run_id = run.info.run_id
    metrics = {"reproduce/weights_max_abs": v.weights_max_abs, "reproduce/seconds": v.seconds}
    for name, value in (("registered", v.registered_metric), ("reproduced", v.reproduced_metric)):
        if value is not None and math.isfinite(value):
            metrics[f"reproduce/{name}_{v.metric.replace('/', '_')}"] = value
    for name, value in metrics.items():
        if math.isfinite(value):
            client.log_metric(rid, name, value)
    client.log_param(rid, "atol", atol)
    client.log_param(rid, "rtol", rtol)
    client.log_dict(rid, v.to_json(), "reproduce.json")
    client.set_terminated(rid, "FINISHED")
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for name, value in {"verdict": v.verdict, "weights_max_abs": repr(v.weights_max_abs),
                        "metric": f"{v.metric} {v.registered_metric} -> {v.reproduced_metric}",
                        "run_id": rid, "at": when}.items():
        client.set_model_version_tag(v.model, v.version, TAG + name, value)


def format_verdict(v: Verdict) -> str:
    """The table people read at the end."""
    def fmt(x: Optional[float]) -> str:
        return "n/a" if x is None else f"{x:.6g}"

    lines = [f"{v.model}:{v.version} rebuilt in {v.seconds:.0f}s: {v.verdict.upper()}", "",
             f"{'':24} {'registered':>14} {'reproduced':>14}",
             f"{v.metric:24} {fmt(v.registered_metric):>14} {fmt(v.reproduced_metric):>14}",
             f"{'parity max abs':24} {fmt(v.registered_parity):>14} {fmt(v.reproduced_parity):>14}",
             f"{'weights max abs diff':24} {fmt(v.weights_max_abs):>14}"]
    if v.worst_weights:
        lines.append("largest differences: " + ", ".join(f"{n} {d:.3g}" for n, d in v.worst_weights))
    lines += [f"warning: {w}" for w in v.warnings]
    lines.append(f"recorded on {v.model} version {v.version} (tags {TAG}*) and in run {v.run_id}")
    return "\n".join(lines)
