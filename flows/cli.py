"""`genflow`: the command line. Heavy libraries load inside each command, so `--help` is instant."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from components.config import Params, load_params
from components.errors import GenflowError, ProjectBusyError, disk_full


# Error classes of components/ that do not derive from GenflowError yet (other branches convert
# them): printed as one line like a GenflowError. DELETE this tuple, and its use in main(), at the
# merge. Named, not imported: a class whose module was never imported cannot have been raised,
# and importing them would load torch for `genflow --help`.
def configure_environment(root: Path) -> None:
    """Local defaults that need no server. Prefect, MLflow, DVC and Great Expectations read them
    when imported: call this before importing flows.retrain."""
    root = Path(root).resolve()
    os.environ.setdefault("PREFECT_HOME", str(root / ".genflow" / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    # The flow runs in this process; its logs must reach the terminal, not only the API.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", metavar="FILE", help="settings file (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. models.digits-unet.train.max_steps=200 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genflow",
        description="Train, measure, export and register diffusion and transformer models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run the retrain flow: validate, train, evaluate, export, register, promote")
    _common(p)
    p.add_argument("--only", metavar="MODELS", help="comma-separated model keys, e.g. digits-unet,pydoc-gpt")
    p.add_argument("--quick", action="store_true", help="tiny budgets, same chain: a first look in minutes")
    p.add_argument("--force", action="store_true", help="retrain even when inputs are unchanged")
    p.add_argument("--wait", action="store_true",
                   help="if another genflow process holds the project (.genflow/run.lock), wait for it")

    p = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    _common(p)
    p.add_argument("name", choices=["ingest", "validate", "prepare", "train", "evaluate", "export"])
    p.add_argument("key", help="dataset (ingest, validate, prepare) or model key (train, evaluate, export)")

    p = sub.add_parser("models", help="list registered models, versions, aliases and primary metrics")
    _common(p)

    p = sub.add_parser("promote", help="make VERSION the champion of MODEL")
    _common(p)
    p.add_argument("model")
    p.add_argument("version")
    p.add_argument("--reason", default="manual promotion", help="why (kept in the version's tags)")

    p = sub.add_parser("rollback", help="make the previous champion of MODEL the champion again")
    _common(p)
    p.add_argument("model")

    p = sub.add_parser("sample", help="generate with a registered model on onnxruntime (no PyTorch)")
    _common(p)
    p.add_argument("model", metavar="MODEL[@alias|:version]", help="e.g. digits-unet@champion or pydoc-gpt:3")
    p.add_argument("-n", "--count", type=int, default=None, help="images or texts to generate")
    p.add_argument("--out", default=None, help="output file (PNG grid or .txt)")
    p.add_argument("--label", type=int, default=None, help="class to generate (images)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (diffusion)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--prompt", default=None, help="text prompt (text models; the caption of a text-to-image model)")
    p.add_argument("--length", type=int, default=None, help="tokens to generate (text models)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default=None, help="text to transduce (sequence-to-sequence models)")
    p.add_argument("--decoding", default=None, choices=("greedy", "sample", "beam"),
                   help="sequence-to-sequence decoding (default: the model's)")
    p.add_argument("--beam-width", type=int, default=None, help="beam search width (--decoding beam)")
    p.add_argument("--exports", default=None, metavar="DIR",
                   help="use a local exports/<model> folder instead of the registry")
    p.add_argument("--inpaint", default=None, metavar="IMAGE", help="complete this image where --mask is white")
    p.add_argument("--mask", default=None, metavar="MASK", help="inpainting mask: white = regenerate, black = keep")
    p.add_argument("--jump", type=int, default=None, metavar="N",
                   help="inpainting: go back N steps up the chain when resampling (default 1)")
    p.add_argument("--resample", type=int, default=None, metavar="R",
                   help="inpainting: denoise each jump R times (default 1: no resampling)")
    p.add_argument("--upscale", default=None, metavar="IMAGE",
                   help="super-resolution: upscale this image (1/factor of the model's size, e.g. 4x4 for digits-sr)")
    p.add_argument("--resize", action="store_true",
                   help="inpainting / --upscale: crop and resize the image to the size the model takes")

    p = sub.add_parser("compare", help="build the diffusion-vs-transformer comparison report")
    _common(p)
    p.add_argument("--run", dest="run_id", default=None, help="pipeline (parent) run id; default: the latest")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="also retrain each model with seeds 0..N-1 at the quick budget (spread over seeds)")

    p = sub.add_parser("reproduce",
                       help="rebuild a registered version from its lineage and compare (never moves aliases)")
    _common(p)
    p.add_argument("model", metavar="MODEL[@alias|:version]", help="e.g. digits-unet@champion or pydoc-gpt:3")
    p.add_argument("--atol", type=float, default=1e-6, help="largest weight difference still 'equal within tolerance'")
    p.add_argument("--rtol", type=float, default=1e-4, help="largest relative metric difference, likewise")
    p.add_argument("--keep", default=None, metavar="DIR", help="copy the rebuilt models/ reports/ exports/ here")

    p = sub.add_parser("schedule", help="serve the retrain flow on a cron schedule (needs PREFECT_API_URL)")
    _common(p)
    p.add_argument("--cron", default=None, help="cron expression (default: schedule.cron in params)")

    p = sub.add_parser("watch", help="emit a Prefect event when a dataset's source changes (retraining "
                       "when data arrives; needs PREFECT_API_URL)")
    _common(p)
    p.add_argument("--every", default="60s", metavar="DURATION", help="how often to look: 60s, 5m, 1h (default 60s)")
    p.add_argument("--once", action="store_true", help="look once and exit (1 if a dataset could not be read)")

    p = sub.add_parser("ui", help="start the MLflow UI on this project's tracking store")
    _common(p)
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1")

    p = sub.add_parser("serve", help="serve registered models over HTTP on onnxruntime, following their alias")
    _common(p)
    p.add_argument("--models", default=None, metavar="A,B", help="model keys (default: every registered model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--poll-seconds", type=float, default=5.0, help="how often the registry's aliases are read")
    p.add_argument("--alias", default="champion", help="the alias served and followed")
    p.add_argument("--max-n", type=int, default=16, help="most images or texts one request may ask for")
    p.add_argument("--max-length", type=int, default=512, help="most characters one text request may ask for")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting per model before 429")
    p.add_argument("--max-batch", type=int, default=8, help="requests run together in one engine call (1: no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a lone request waits for company")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take before 504")
    p.add_argument("--pinned-cache", type=int, default=4, help="pinned versions kept loaded")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: cores)")
    p.add_argument("--shadow", type=float, nargs="?", const=0.1, default=0.0, metavar="FRACTION",
                   help="also run the challenger on this fraction of requests (0.1 when no value is given)")
    return parser


def _load(args) -> Params:
    params = load_params(args.params, args.overrides)
    if params.tracking.tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        from components.tracking import URI_FROM_PARAMS_ENV

        os.environ["MLFLOW_TRACKING_URI"] = params.tracking.tracking_uri  # one setting for every command
        os.environ[URI_FROM_PARAMS_ENV] = "1"                              # messages name params.yaml
    return params


def cmd_run(args) -> int:
    from flows.preflight import preflight

    params = _load(args)
    only = [m.strip() for m in args.only.split(",") if m.strip()] if args.only else None
    configure_environment(Path.cwd())   # environment only: Prefect is imported after the checks
    keys = preflight(params, Path.cwd(), only)   # bad input refused in one line before any work
    choose_threads(params, keys)                 # before anything imports torch
    from flows.retrain import run_pipeline

    summary = run_pipeline(params, Path.cwd(), only=keys, quick=args.quick, force=args.force,
                           params_path=args.params, overrides=args.overrides, checked=True)
    if summary["status"] == "completed":
        return 0
    from flows.retrain import failure_message

    print(f"genflow run: failed: {failure_message(summary)}", file=sys.stderr)
    return 1


def choose_threads(params, keys: list[str]) -> None:
    """The training processes' thread policy, measured (components/threads.py) unless the
    environment or train.threads already decide it; OpenMP reads it when torch is imported."""
    from components import threads

    if "torch" in sys.modules:   # too late to choose a wait policy in this process
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        return
    choice = threads.choose(Path.cwd(), params, keys)
    if choice is None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # spinning OpenMP threads stall shared cores
        return
    choice.apply()
    print(f"thread policy: {choice.describe()}", flush=True)


def cmd_stage(args) -> int:
    from flows.stages import run_stage

    params = _load(args)
    if args.name == "train":
        choose_threads(params, [args.key])
    else:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    result = run_stage(params, args.name, args.key, Path.cwd())
    print(f"{args.name} {args.key}: done" + (f" ({_short(result)})" if result else ""))
    return 0


def _short(result: dict) -> str:
    items = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
             if isinstance(v, (int, float, str)) and len(str(v)) < 60]
    return ", ".join(items[:6])


def cmd_models(args) -> int:
    from components import registry

    _load(args)
    print(registry.format_table(registry.models_table(Path.cwd())))
    return 0


def cmd_promote(args) -> int:
    from components import registry

    decision = registry.promote(args.model, args.version, args.reason, _load(args), Path.cwd())
    state = "is now champion" if decision.promoted else "is already champion"
    print(f"{args.model} version {args.version} {state} ({decision.reason})")
    return 0


def cmd_rollback(args) -> int:
    from components import registry

    _load(args)
    version = registry.rollback(args.model, Path.cwd())
    print(f"{args.model}: version {version} is champion again")
    return 0


def cmd_sample(args) -> int:
    from flows.sample import sample_cli, sample_source_cli

    if args.source is not None:   # an encoder-decoder's target for one source
        out = sample_source_cli(args, Path.cwd())
    else:
        out = sample_cli(args, Path.cwd())
    print(f"wrote {out}")
    return 0


def cmd_compare(args) -> int:
    from flows.compare import build_report

    out = build_report(_load(args), Path.cwd(), run_id=args.run_id, seeds=args.seeds)
    print(f"wrote {out}")
    return 0


def cmd_reproduce(args) -> int:
    from components.reproduce import DIFFERENT, format_verdict, reproduce

    verdict = reproduce(args.model, Path.cwd(), _load(args), atol=args.atol, rtol=args.rtol,
                        keep=Path(args.keep).resolve() if args.keep else None)
    print(format_verdict(verdict))
    return 2 if verdict.verdict == DIFFERENT else 0


def cmd_schedule(args) -> int:
    params = _load(args)
    configure_environment(Path.cwd())
    from flows.retrain import serve_schedule

    serve_schedule(params, Path.cwd(), cron=args.cron, params_path=args.params)
    return 0


def cmd_watch(args) -> int:
    from flows.watch import parse_every, watch_loop

    every = parse_every(args.every)
    params = _load(args)
    configure_environment(Path.cwd())   # Prefect's settings, before flows.watch imports it to emit
    return watch_loop(params, Path.cwd(), every, args.once)


def cmd_ui(args) -> int:
    import subprocess

    from components.tracking import is_server, redact, tracking_uri

    uri = tracking_uri(Path.cwd(), _load(args))
    if is_server(uri):
        print(f"genflow ui: the tracking store is the MLflow server {redact(uri)}; open that URL in a browser "
              "(its UI is already running there)", file=sys.stderr)
        return 1
    print(f"MLflow UI for {redact(uri)} at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", args.host, "--port", str(args.port)]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def cmd_serve(args) -> int:
    from components.errors import ConfigError

    if Path(args.params).is_file() or args.overrides:  # a container may have only MLFLOW_TRACKING_URI
        params = _load(args)
    else:
        params = None
    for flag, value, low in (("--port", args.port, 0), ("--max-n", args.max_n, 1), ("--max-length", args.max_length, 1),
                             ("--max-queue", args.max_queue, 1), ("--max-batch", args.max_batch, 1),
                             ("--pinned-cache", args.pinned_cache, 1), ("--poll-seconds", args.poll_seconds, 0.1),
                             ("--timeout", args.timeout, 0.1), ("--batch-wait-ms", args.batch_wait_ms, 0),
                             ("--shadow", args.shadow, 0)):
        high = {"--port": 65535, "--shadow": 1}.get(flag)
        if value < low or (high is not None and value > high):
            raise ConfigError(f"{flag}: {value} is out of range (at least {low:g}"
                              f"{f', at most {high}' if high is not None else ''})")
    from components.serving.app import ServeSettings, serve
    from components.tracking import tracking_uri

    models = tuple(m.strip() for m in (args.models or "").split(",") if m.strip())
    settings = ServeSettings(root=Path.cwd(), tracking_uri=tracking_uri(Path.cwd(), params), models=models,
                             alias=args.alias, poll_seconds=args.poll_seconds, max_n=args.max_n,
                             max_length=args.max_length, max_queue=args.max_queue, max_batch=args.max_batch,
                             batch_wait_ms=args.batch_wait_ms, timeout_s=args.timeout,
                             pinned_cache=args.pinned_cache, threads=args.threads, shadow=args.shadow)
    serve(settings, args.host, args.port)
    return 0


# The commands that write data/, models/, exports/, reports/ or the registry: one at a time per
# project (components/project_lock.py); a second one exits 3 at once, or waits with `run --wait`.
LOCKED = ("run", "stage", "promote", "rollback", "compare", "reproduce")

COMMANDS = {
    "run": cmd_run, "stage": cmd_stage, "models": cmd_models, "promote": cmd_promote,
    "rollback": cmd_rollback, "sample": cmd_sample, "compare": cmd_compare,
    "reproduce": cmd_reproduce, "schedule": cmd_schedule, "watch": cmd_watch, "ui": cmd_ui,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in ("run", "stage"):   # those two measure their training's policy first
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall 2-core machines
    if not args.command:
        parser.print_help()
        return 0
    from components import interrupt

    interrupt.install()   # Ctrl-C also stops training running in the flow's worker threads
    try:
        if args.command not in LOCKED:
            return COMMANDS[args.command](args)
        from components.project_lock import project_lock

        command = " ".join(["genflow", *(sys.argv[1:] if argv is None else argv)])
        with project_lock(Path.cwd(), command, wait=getattr(args, "wait", False), can_wait=args.command == "run",
                          on_wait=lambda line: print(f"genflow {args.command}: {line}", file=sys.stderr, flush=True)):
            return COMMANDS[args.command](args)
    except ProjectBusyError as e:   # not a failure of this command: it did nothing; a distinct exit code
        from components.project_lock import BUSY_EXIT

        print(f"genflow {args.command}: {e}", file=sys.stderr)
        return BUSY_EXIT
    except KeyboardInterrupt:
        print("genflow: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if interrupt.stop_requested():   # Ctrl-C also stopped the local Prefect server: not a new error
            print("genflow: interrupted", file=sys.stderr)
            return 130
        full = disk_full(e)   # a full disk is no bug: one line naming where
        if full and not os.environ.get("GENFLOW_DEBUG"):
            print(f"genflow {args.command}: {full}", file=sys.stderr)
            return 1
        if not isinstance(e, GenflowError) or os.environ.get("GENFLOW_DEBUG"):
            raise   # anything else is a bug: its traceback is what finds it
        # A GenflowError is written for people: one line, naming what and where.
        text = str(e).strip()
        print(f"genflow {args.command}: {text.splitlines()[0] if text else type(e).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
