"""The HTTP app of `genflow serve` (FastAPI): routes, error bodies, the background poller.

    app = create_app(ServeSettings(root=Path("."), tracking_uri="sqlite:///.genflow/mlflow.db"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: GET /healthz, /readyz, /metrics, /v1/models; POST /v1/models/{name}/generate and
/v1/models/{name}/versions/{version}/generate; the OpenAPI page at /docs. Every refusal is a
JSON body ``{"error": ..., "detail": [{"field", "problem", "allowed", "got"}]}`` and is counted
in /metrics; nothing a client sends stops the server or the model it asked for.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from components.errors import ServerError
from components.inference import InferenceError
from components.serving.follow import Follower, FollowSettings, Poller, one_line
from components.serving.generate import ImageRequest, Limits, RequestProblem, TextRequest, UpscaleRequest, plan
from components.serving.metrics import CONTENT_TYPE, ServeMetrics
from components.serving.models import ModelTable, Served, SmokeCheckFailed, VersionNotFound, load_version
from components.serving.queue import ModelQueue, QueueFull
from components.serving.shadow import CHALLENGER, Shadow

log = logging.getLogger("genflow.serve")


@dataclass(frozen=True)
class ServeSettings:
    """Everything `genflow serve` can be told (its flags)."""

    root: Path
    tracking_uri: str
    models: tuple[str, ...] = ()     # empty: every registered model holding the alias
    alias: str = "champion"
    poll_seconds: float = 5.0
    max_n: int = 16
    max_length: int = 512
    max_queue: int = 16
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    timeout_s: float = 60.0
    pinned_cache: int = 4
    threads: Optional[int] = None
    shadow: float = 0.0              # fraction of alias requests also run on the challenger (0: off)


def iso(t: Optional[float]) -> Optional[str]:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def refusal(status: int, error: str, detail: list[dict], headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def inline_schema(model) -> dict:
    """A pydantic model's JSON schema with its nested models written in place: its "#/$defs/..."
    references would not resolve inside the OpenAPI document."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.rsplit("/", 1)[1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node
    return resolve(schema)


GENERATE_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "oneOf": [inline_schema(ImageRequest), inline_schema(TextRequest), inline_schema(UpscaleRequest)]},
    "examples": {"image": {"value": {"n": 4, "label": 3, "steps": 20, "guidance": 1.0, "seed": 0}},
                 "inpaint": {"value": {"n": 2, "seed": 0, "inpaint": {
                     "image": [[0, 0, 5, 13, 9, 1, 0, 0]] * 4 + [[0] * 8] * 4,
                     "mask": [[0] * 8] * 4 + [[1] * 8] * 4, "jump": 5, "resample": 2}}},
                 "text": {"value": {"prompt": "Return the ", "length": 64, "temperature": 0.8, "top_k": 0,
                                    "seed": 0}},
                 "upscale": {"value": {"upscale": [[0, 6, 9, 0], [0, 11, 3, 0], [0, 9, 0, 0], [0, 5, 2, 0]], "n": 2,
                                       "steps": 20, "seed": 0}}}}}}}


class Unavailable(ServerError):
    """A model that is requested but not loaded yet, or a registry that does not answer: 503."""


class Server:
    """The state behind the routes: table, follower, queues, metrics."""

    def __init__(self, settings: ServeSettings, follower: Optional[Follower] = None):
        self.settings = settings
        self.metrics = ServeMetrics()
        self.table = ModelTable(settings.pinned_cache)
        self.limits = Limits(settings.max_n, settings.max_length)
        self.follower = follower or Follower(
            FollowSettings(settings.root, settings.tracking_uri, settings.alias, settings.models, settings.threads),
            self.table, self.metrics)
        self.follower.table, self.follower.metrics = self.table, self.metrics
        self.queues: dict[str, ModelQueue] = {}
        self.shadow: Optional[Shadow] = None
        if settings.shadow > 0:
            challengers = Follower(FollowSettings(settings.root, settings.tracking_uri, CHALLENGER, settings.models,
                                                  settings.threads), ModelTable(1), self.metrics,
                                   report_registry=False)
            self.shadow = Shadow(challengers, self.metrics, self.limits, settings.shadow)

    def queue(self, name: str) -> ModelQueue:
        if name not in self.queues:
            s = self.settings
            self.queues[name] = ModelQueue(name, self.metrics, s.max_queue, s.max_batch, s.batch_wait_ms / 1000)
        return self.queues[name]

    # --- lookups ---------------------------------------------------------------

    def served(self, name: str) -> Served:
        served = self.table.get(name)
        if served is not None:
            return served
        if name in self.follower.states:
            state = self.follower.states[name]
            if state.missing:
                raise VersionNotFound(state.problem or f"{name}: not in the MLflow registry")
            if state.failed_version is not None:
                raise Unavailable(state.problem or f"{name}: version {state.failed_version} refused")
            raise Unavailable(state.problem or f"{name}: not loaded yet; retry shortly")
        raise VersionNotFound(f"model {name!r} is not served here; served: {', '.join(self.table.names()) or 'none'}")

    def pinned(self, name: str, version: str) -> Served:
        """name:version, loaded on first use (blocking: call on a thread)."""
        from mlflow.exceptions import MlflowException

        from components.serving.follow import is_not_found

        if not version.isdigit():
            raise VersionNotFound(f"{name}: version {version!r} is not a version number")

        def load() -> Served:
            try:
                mv = self.follower.client().get_model_version(name, version)
            except MlflowException as e:
                if not is_not_found(e):
                    raise Unavailable(f"registry unreachable ({one_line(e)}); pinned versions need it once") from None
                raise VersionNotFound(f"{name}:{version}: no such version in the MLflow registry") from None
            except Exception as e:
                raise Unavailable(f"registry unreachable ({one_line(e)}); pinned versions need it once") from None
            try:
                return load_version(mv, None, self.settings.root, self.settings.threads, check=False)
            except (InferenceError, SmokeCheckFailed) as e:
                raise RequestProblem("version", f"{name}:{version} cannot be served: {one_line(e)}") from None

        return self.table.pinned(name, version, load)

    def models(self) -> list[dict]:
        out = []
        reg = self.follower.registry
        for name in sorted(set(self.follower.requested()) | set(self.table.names())):
            s, state = self.table.get(name), self.follower.states.get(name)
            row: dict[str, Any] = {"name": name, "alias": self.settings.alias,
                                   "version": s.version if s else None, "run_id": s.run_id if s else None,
                                   "parity_max_abs": s.parity_max_abs if s else None,
                                   "provider": s.provider if s else None, "loaded_at": iso(s.loaded_at) if s else None,
                                   "kind": s.engine.kind if s else None, "graph": s.engine.graph if s else None,
                                   "status": "serving" if s else "not ready",
                                   "alias_version": state.wanted_version if state else None,
                                   "problem": state.problem if state and not s else None,
                                   "last_swap_error": state.last_swap_error if state else None,
                                   "last_successful_poll": iso(reg.last_ok),
                                   "registry_reachable": reg.reachable,
                                   "pinned_versions": [v for n, v in self.table.pinned_versions() if n == name]}
            if self.shadow is not None:
                row["shadow"] = self.shadow.describe(name)
            out.append(row)
        return out


def create_app(settings: ServeSettings, follower: Optional[Follower] = None) -> FastAPI:
    """The FastAPI app; its lifespan runs the registry poller (the first poll right away)."""
    server = Server(settings, follower)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        pollers = [loop.create_task(Poller(server.follower, settings.poll_seconds).run())]
        if server.shadow is not None:
            pollers.append(loop.create_task(Poller(server.shadow.follower, settings.poll_seconds).run()))
        try:
            yield
        finally:
            for poller in pollers:
                poller.cancel()
            if server.shadow is not None:
                await server.shadow.stop()
            for q in list(server.queues.values()):
                await q.stop()

    app = FastAPI(title="genflow serve", lifespan=lifespan,
                  description="Registered genflow models on onnxruntime, following their registry alias.")
    app.state.server = server
    m = server.metrics

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        reason = server.follower.not_ready_reason()
        if reason:
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        return {"status": "ready", "models": {n: server.table.get(n).version for n in server.table.names()}}

    @app.get("/metrics")
    async def metrics():
        return Response(m.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> list:
        return server.models()

    async def generate(name: str, request: Request, version: Optional[str]) -> Response:
        started = time.perf_counter()
        label = name if name in server.follower.states or server.table.get(name) else "(unknown)"

        def refuse(status: int, kind: str, error: str, detail: list[dict], headers: Optional[dict] = None):
            m.errors.labels(label, kind).inc()
            m.requests.labels(label, version or "-", str(status)).inc()
            return refusal(status, error, detail, headers)

        def plain(problem: str, field_name: Optional[str] = None, got: Any = None) -> list[dict]:
            return [{"field": field_name, "problem": problem, "allowed": None, "got": got}]

        try:
            served = (server.served(name) if version is None
                      else await asyncio.to_thread(server.pinned, name, version))
            try:
                body = await request.json()
            except ValueError as e:
                raise RequestProblem("body", f"not valid JSON ({e})", "a JSON object") from None
            job = plan(served.engine, body, server.limits)
            outputs = await server.queue(name).submit(served, job, settings.timeout_s)
        except RequestProblem as e:
            return refuse(422, "invalid", "invalid request", e.detail)
        except VersionNotFound as e:
            field_name = "version" if version is not None and label != "(unknown)" else "name"
            return refuse(404, "not_found", "not found", plain(str(e), field_name, version or name))
        except Unavailable as e:
            return refuse(503, "unavailable", "not ready", plain(str(e), "name", name),
                          {"Retry-After": str(max(1, round(settings.poll_seconds)))})
        except QueueFull as e:
            return refuse(429, "queue_full", "queue full", plain(str(e)), {"Retry-After": "1"})
        except asyncio.TimeoutError:
            return refuse(504, "timeout", "timeout", plain(f"no answer within {settings.timeout_s:g}s (--timeout)"))
        except Exception as e:  # a bug or a broken model: answered, counted and logged; the server goes on
            log.exception("%s: request failed", name)
            return refuse(500, "failed", "failed", plain(f"{type(e).__name__}: {e}"[:300]))
        took = time.perf_counter() - started
        m.requests.labels(name, served.version, "200").inc()
        m.latency.labels(name, served.version).observe(took)
        if server.shadow is not None and version is None:
            server.shadow.maybe(served, body, job.kind, outputs)
        key = "images" if job.kind == "images" else "texts"
        return JSONResponse({"model": name, "version": served.version,
                             "alias": served.alias, key: outputs, "ms": round(took * 1000, 2)})

    @app.post("/v1/models/{name}/generate", openapi_extra=GENERATE_BODY)
    async def generate_alias(name: str, request: Request) -> Response:
        """Generate with the version the alias points at (images or texts, by the model's kind)."""
        return await generate(name, request, None)

    @app.post("/v1/models/{name}/versions/{version}/generate", openapi_extra=GENERATE_BODY)
    async def generate_pinned(name: str, version: str, request: Request) -> Response:
        """Generate with one registered version (loaded on first use, kept in a small LRU cache)."""
        return await generate(name, request, version)

    return app


def check_port(host: str, port: int) -> None:
    """ServerError now (one line) rather than uvicorn's exit after start-up when the port is taken."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise ServerError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                          "pick another port or stop what uses it") from None


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app on uvicorn until SIGINT/SIGTERM (the in-flight requests are answered first)."""
    import os

    import uvicorn

    # a registry that does not answer must fail a poll in seconds, not after MLflow's minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    check_port(host, port)
    from components.tracking import redact

    log.info("genflow serve on http://%s:%d: %s@%s from %s, polling every %gs", host, port,
             ",".join(settings.models) or "every registered model", settings.alias,
             redact(settings.tracking_uri), settings.poll_seconds)
    uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=port, log_level="info",
                                  timeout_graceful_shutdown=max(5, int(settings.timeout_s)))).run()
