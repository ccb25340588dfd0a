"""The Ray Serve application: published group edits behind an OpenAI-compatible API.

Two deployments, one concern each:

    HTTP ─► ChameleonIngress (FastAPI)          auth, request size, validation, OpenAI shapes, SSE
               │  handle.options(stream=True).generate.remote(GenerationRequest)
               │  ◄── Started, Generated…, Finished | Failed          (chameleon.serving.replica_api)
               ▼
            ChameleonServer (model replica)     tokenizer limits, run + group resolution, EditCache,
                                                the engine: one batched decode for every group

`ChameleonServer` wraps a `ModelServer` (chameleon.serving.replica, no Ray): the base model and,
per bank layout, an `EditBank` on the model's device with an `EditCache` deciding which
(run, group) edits occupy its rows. A continuous-batching `Engine` (chameleon.serving.engine)
admits requests into its running batch at every decode step and retires them as they end; every
edited layer applies all rows' edits in one batched operation. Metrics go to Prometheus through `ray.serve.metrics`
(chameleon.serving.metrics); the response id is Serve's request id (the `X-Request-ID` header).

Runs load from the store by id or through `latest` (polled every `refresh_interval_s` in a
background thread; chameleon.serving.registry). A run made for another model (fingerprint
mismatch) or with a file that fails its checksum is refused, the previous run keeps serving, and
`/healthz` says why. The run can also be switched on running replicas: the `user_config` of
`ChameleonServer` in a Serve config (`{run: <id> | latest}`) reaches `reconfigure`, which loads the
run without reloading the model.

`app_builder(args)` is the import path of the Serve config files (`cluster/serve-config.yaml`);
`build_app(ServeConfig, store=...)` is the same from Python (the store object may carry keys).
This is the only serving module that imports Ray, Serve, FastAPI or Starlette.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
import typing
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import metrics as serve_metrics
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from chameleon.core.devices import gpus_per_replica
from chameleon.core.model import runs_on_cpu, worker_torch_threads
from chameleon.data.storage import Store
from chameleon.ray_env import cluster_gpus
from chameleon.serving.access import api_key
from chameleon.serving.answers import Answer, collect, started_or_raise
from chameleon.serving.config import ServeConfig, ServeUserConfig
from chameleon.serving.metrics import TAG_KEYS, ServingMetrics
from chameleon.serving.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    HealthBody,
    ModelCard,
    ModelList,
    RequestBody,
    WireModel,
    decode_body,
    parse_request,
    public_error,
    sse_line,
    timeout_error,
)
from chameleon.serving.replica import ModelServer
from chameleon.serving.replica_api import GenerationRequest, ReplicaEvent, Started
from chameleon.serving.run_model import with_run_model

log = logging.getLogger("chameleon.serving")

# ---------------------------------------------------------------------------------------------
# HTTP ingress


def json_response(body: WireModel, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body.wire(), status_code=status, headers=headers)


def error_response(exc: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return json_response(exc.body(), exc.status, headers)


api = FastAPI(title="Chameleon (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)


def _hints(fn):
    """Resolve a route's string annotations (this module uses postponed evaluation) before Serve
    rewrites its signature; otherwise FastAPI would read `request: "Request"` as a query field."""
    fn.__annotations__ = typing.get_type_hints(fn)
    return fn


@api.exception_handler(ApiError)
async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    retry = getattr(exc, "retry_after", None)  # set by the ingress on answers a retry may cure
    if retry is not None:
        headers["Retry-After"] = str(retry)
    return error_response(exc, headers or None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = "no such route" if exc.status_code == 404 else str(exc.detail)
    return error_response(
        ApiError(exc.status_code, message, "not_found" if exc.status_code == 404 else "http_error")
    )


def _request_id() -> str:
    """Serve's id of the HTTP request (what its proxy returns as `X-Request-ID`)."""
    with contextlib.suppress(Exception):
        rid = serve.context._get_serve_request_context().request_id
        if rid:
            return str(rid)
    return uuid.uuid4().hex


_HEALTH_TIMEOUT_S = 10.0
"""/healthz and /status answer `unavailable` when the model replica takes longer than this."""


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


# Helpers the ingress uses are defined above it: `serve.ingress` serializes the class when it is
# decorated, so names defined later in this module would be missing in the replica.


# `max_ongoing_requests` comes from ServeConfig in `build_app`.
@serve.deployment(name="ChameleonIngress", ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class ChameleonIngress:
    """HTTP: auth, size limits, validation, OpenAI response shapes and server-sent events."""

    def __init__(self, server, settings: dict[str, Any]) -> None:
        self.cfg = ServeConfig.model_validate(settings)
        self.server = server
        self.streaming = server.options(stream=True)
        # Fail closed: no key and no allow_unauthenticated -> AuthConfigError, the replica never starts.
        self.api_key = api_key(self.cfg)

    # -- plumbing ----------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(
                401, "missing or invalid API key (send 'Authorization: Bearer <key>')", "invalid_api_key"
            )

    async def _json(self, request: Request) -> Any:
        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(
                413,
                f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                "request_too_large",
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes", "request_too_large")
        return decode_body(bytes(body))

    async def _start(self, request: GenerationRequest, deadline: float) -> tuple[Any, Started]:
        """Send the typed request to the model replica: its event stream and its `Started`."""
        gen = self.streaming.generate.remote(request)
        try:
            first: ReplicaEvent = await asyncio.wait_for(gen.__anext__(), _left(deadline))
        except TimeoutError:
            with contextlib.suppress(Exception):
                gen.cancel()
            raise timeout_error(self.cfg.request_timeout_s) from None
        except BackPressureError:
            raise ApiError(
                503, "the server is overloaded (model queue full); retry shortly", "server_overloaded"
            ) from None
        except Exception as exc:
            log.exception("model replica failed")
            raise ApiError(
                503, f"the model replica is unavailable: {type(exc).__name__}", "replica_unavailable"
            ) from None
        return gen, started_or_raise(first)

    def _public(self, exc: ApiError) -> ApiError:
        out = public_error(exc)
        if out.status in (429, 503):
            out.retry_after = self.cfg.retry_after_s
        return out

    async def _complete(self, request: Request, cls: type[RequestBody]):
        try:
            return await self._answer(request, cls)
        except ApiError as exc:
            raise self._public(exc) from None

    async def _answer(self, request: Request, cls: type[RequestBody]):
        deadline = time.monotonic() + self.cfg.request_timeout_s
        self._auth(request)
        body = parse_request(cls, await self._json(request), self.cfg.model_name, self.cfg.max_tokens_limit)
        gen, started = await self._start(GenerationRequest.from_body(body), deadline)
        response = Answer(body, started, _request_id(), self.cfg.personalization_detail)
        if body.stream:
            return StreamingResponse(
                self._sse(gen, response, deadline),
                media_type="text/event-stream",
                headers={**response.headers(), "Cache-Control": "no-cache"},
            )
        try:
            text, ids, end = await collect(lambda: asyncio.wait_for(anext(gen), _left(deadline)))
        except ApiError:
            raise
        except TimeoutError:
            with contextlib.suppress(Exception):
                gen.cancel()
            raise timeout_error(self.cfg.request_timeout_s) from None
        except Exception as exc:  # the replica died mid-answer (RayActorError, ...)
            log.warning("model replica failed mid-request: %r", exc)
            raise ApiError(
                503, f"the model replica failed: {type(exc).__name__}; retry", "replica_unavailable"
            ) from None
        return json_response(response.completion(text, ids, end), headers=response.headers())

    async def _sse(self, gen, response: Answer, deadline: float) -> AsyncIterator[str]:
        finished = timed_out = False
        try:
            for chunk in response.opening_chunks():
                yield sse_line(chunk)
            done = False
            while not done:
                try:
                    event = await asyncio.wait_for(anext(gen), _left(deadline))
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    timed_out = True  # not finished: the finally cancels the request on the replica
                    yield sse_line(timeout_error(self.cfg.request_timeout_s).body())
                    break
                bodies, done = response.chunks_for(event)
                for b in bodies:
                    yield sse_line(b)
            finished = not timed_out
        except Exception as exc:
            log.exception("stream failed")
            yield sse_line(ApiError(500, f"stream failed: {type(exc).__name__}", "internal_error").body())
            finished = True
        finally:
            if not finished:
                with contextlib.suppress(Exception):
                    gen.cancel()  # the client went away: stop the request on the replica
        yield "data: [DONE]\n\n"

    # -- routes --------------------------------------------------------------------------------

    @api.get("/healthz")
    @_hints
    async def healthz(self) -> JSONResponse:
        """Unauthenticated: `{"status": ok | degraded | unavailable}` and nothing else."""
        try:
            state = await asyncio.wait_for(self.server.status.remote(), _HEALTH_TIMEOUT_S)
        except Exception:
            log.warning("health: the model replica did not answer", exc_info=True)
            state = "unavailable"
        return json_response(HealthBody(status=state), 503 if state == "unavailable" else 200)

    @api.get("/status")
    @_hints
    async def status(self, request: Request) -> JSONResponse:
        """Authenticated: what a replica serves and why not (runs, store errors, caches, batching)."""
        self._auth(request)
        try:
            status = await asyncio.wait_for(self.server.health.remote(), _HEALTH_TIMEOUT_S)
        except Exception as exc:
            problem = f"model replica: {type(exc).__name__}: {exc}"
            return json_response(HealthBody(status="unavailable", problems=[problem]), 503)
        status["auth"] = self.api_key is not None
        return JSONResponse(status, status_code=503 if status["status"] == "unavailable" else 200)

    @api.get("/v1/models")
    @_hints
    async def models(self, request: Request) -> JSONResponse:
        """The base model, then one entry per group of the run being served: `<model>:<group>`
        (the Ray Serve LLM convention for adapters), so any OpenAI client can pick a group."""
        self._auth(request)
        name, root = self.cfg.model_name, self.cfg.model.name_or_path
        cards = [ModelCard(id=name, root=root, parent=None)]
        with contextlib.suppress(Exception):  # no replica answering: the base model alone
            run_id, groups = await self.server.groups.remote()
            cards += [ModelCard(id=f"{name}:{g}", root=root, parent=name, run_id=run_id) for g in groups]
        return json_response(ModelList(data=cards))

    @api.post("/v1/chat/completions")
    @_hints
    async def chat_completions(self, request: Request):
        return await self._complete(request, ChatRequest)

    @api.post("/v1/completions")
    @_hints
    async def completions(self, request: Request):
        return await self._complete(request, CompletionRequest)


# ---------------------------------------------------------------------------------------------
# Model replica


def _serve_metric(kind: str, name: str, description: str, boundaries):
    """The `ServingMetrics` factory of a replica: `ray.serve.metrics` objects (Prometheus)."""
    tags = TAG_KEYS.get(name)
    if kind == "counter":
        return serve_metrics.Counter(name, description=description, tag_keys=tags)
    if kind == "gauge":
        return serve_metrics.Gauge(name, description=description, tag_keys=tags)
    return serve_metrics.Histogram(name, description=description, boundaries=list(boundaries), tag_keys=tags)


def _set_torch_threads(cfg: ServeConfig) -> None:
    """On CPU replicas, use as many torch threads as CPUs the replica holds; GPU replicas keep
    torch's default."""
    if not runs_on_cpu(cfg.model):
        return
    cpus = cfg.num_cpus
    if ray.is_initialized():  # inside a Serve replica; never start a Ray just to ask
        with contextlib.suppress(Exception):
            cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", cpus))
    if cpus >= 1:
        worker_torch_threads(math.floor(cpus))


# Resources, replicas and batch size come from ServeConfig in `build_app` and `__init__`.
@serve.deployment(name="ChameleonServer")
class ChameleonServer:
    """The model replica: admission, the edit cache, batched decoding (streams events)."""

    def __init__(self, settings: dict[str, Any], store: Store | None = None) -> None:
        self.cfg = ServeConfig.model_validate(settings)
        _set_torch_threads(self.cfg)
        self.metrics = ServingMetrics(_serve_metric)
        self.core = ModelServer(self.cfg, store, self.metrics)
        self.core.start_polling()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.core.stop_polling()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's lightweight update: apply this deployment's `user_config` (`ServeUserConfig`)
        on the running replica. `run` switches the run served (pin one, or `latest` to follow the
        pointer) without reloading the model; requests in flight finish on their run. A run that
        cannot be loaded leaves the current one serving, and `/healthz` says why. Invalid
        settings raise, so a typo fails the deploy instead of being ignored."""
        update = ServeUserConfig.model_validate(user_config or {})
        if update.run is not None and update.run != self.cfg.run:
            # A run that cannot be loaded yet is retried by the poller until it is served.
            await asyncio.to_thread(self.core.switch_run, update.run)

    async def health(self) -> dict[str, Any]:
        return self.core.health()

    async def groups(self) -> tuple[str | None, list[str]]:
        """(run served, its group ids) for `/v1/models`."""
        run = self.core.registry.current
        return (run.run_id, sorted(run.group_ids)) if run is not None else (None, [])

    async def status(self) -> str:
        return self.core.status()

    async def check_health(self) -> None:
        """Serve's periodic probe: raising (or not answering within health_check_timeout_s) gets
        the replica restarted. It fails when the decode loop is dead or stalled with requests
        waiting (`engine_stall_timeout_s`), and hangs (so times out) when the device is wedged."""
        await asyncio.to_thread(self.core.check_health)

    async def refresh(self) -> dict[str, Any]:
        """Check the store now (tests and operators; the poller does it every refresh_interval_s)."""
        await asyncio.to_thread(self.core.registry.refresh)
        return self.core.health()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[ReplicaEvent]:
        """Events: `Started` (or `Failed`), then `Generated`…, then `Finished` (`ModelServer.events`)."""
        async with contextlib.aclosing(self.core.events(request, _request_id)) as events:
            async for ev in events:
                yield ev


# ---------------------------------------------------------------------------------------------
# Building the application


def cluster_gpu_capacity() -> float:
    """GPUs of the Ray cluster serving runs on (`ray_env.cluster_gpus`): those it has now, or the
    most its autoscaler can add. The job's Ray driver reads them the same way
    (`job.replicas.cluster_gpu_capacity`): serving may not import the job, and Ray stays out of
    the shared leaf (DESIGN §2)."""
    from ray._private.state import state

    try:  # the autoscaler's node types, as Ray Train reads them; None when not reported
        autoscaler_max = state.get_max_resources_from_cluster_config()
    except Exception:  # an older or a client-mode connection: what the cluster has now
        autoscaler_max = None
    return cluster_gpus(ray.cluster_resources(), autoscaler_max)


def replica_gpus(cfg: ServeConfig) -> float:
    """GPUs per model replica: `num_gpus` resolved against this Ray cluster (`core.devices`)."""
    if not ray.is_initialized():  # an application built offline to check a config: as is
        return 0.0 if cfg.num_gpus == "auto" else float(cfg.num_gpus)
    return gpus_per_replica(cfg.num_gpus, cluster_gpu_capacity(), setting_name="num_gpus (--num-gpus)")


def build_app(cfg: ServeConfig, store: Store | None = None):
    """The Serve application: `ChameleonIngress` (HTTP) in front of `ChameleonServer` (model).

    `store` overrides `cfg.store` with a ready store object (e.g. an `S3Store` carrying keys);
    otherwise each replica opens `cfg.store` with the AWS credentials of its environment.
    """
    settings = cfg.model_dump()
    # Bounded queues at the proxy and at the ingress's handle: past them, 503 + Retry-After at once.
    queues = {
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": cfg.retry_after_s},
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
    }
    server = ChameleonServer.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": replica_gpus(cfg)},
        health_check_period_s=cfg.health_check_period_s,
        health_check_timeout_s=cfg.health_check_timeout_s,
        **queues,
    ).bind(settings, store)
    return ChameleonIngress.options(max_ongoing_requests=cfg.max_ongoing_requests, **queues).bind(
        server, settings
    )


def app_builder(args: dict[str, Any]):
    """Import path of the Serve config files: `chameleon.serving:app_builder` with `args` =
    `ServeConfig` fields (`store`, `run`, `model`, ...; model fields left out: `serving.run_model`)."""
    return build_app(with_run_model(ServeConfig.model_validate(dict(args or {})))[0])
