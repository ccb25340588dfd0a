"""`ChameleonServer.reconfigure`: the deployment's `user_config` switches the run being served on a
running replica without reloading the model (what a RayService `serveConfigV2` edit of
`user_config.run` does), and refuses settings it does not know.

The replica class runs here without Ray (Serve calls the same methods), then once on a real
Serve (slow): a tiny published run, copied under two run ids into a local store.
"""

from __future__ import annotations

import asyncio
import time
import warnings

import pytest
from conftest import copy_run

from chameleon.data.storage import LocalStore

with warnings.catch_warnings():  # Ray Serve's own pydantic models warn on import; not ours
    warnings.simplefilter("ignore", DeprecationWarning)
    from chameleon.serving.app import ChameleonServer
    from chameleon.serving.config import ServeConfig, ServeUserConfig

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def replica(published_tiny_run, tmp_path_factory):
    src, _manifest, model_dir = published_tiny_run
    store = LocalStore(tmp_path_factory.mktemp("reconfigure") / "store")
    for new_id in ("run-a", "run-b"):
        copy_run(src, store, "tiny-run-1", new_id)
    store.put_text("latest", "run-b\n")
    cfg = ServeConfig(store=store.uri, model=str(model_dir), refresh_interval_s=3600)
    with pytest.MonkeyPatch.context() as mp:
        # Outside a replica, asking Ray for the replica's CPUs would start a Ray of its own.
        mp.setattr("chameleon.serving.app._set_torch_threads", lambda cfg: None)
        server = ChameleonServer.func_or_class(cfg.model_dump(), store)
    yield server, store
    server.core.stop_polling()


def serving(server) -> tuple[str | None, str]:
    status = server.core.registry.status()
    return status["run_id"], status["requested_run"]


def test_user_config_is_validated():
    assert ServeUserConfig.model_validate({}).run is None
    assert ServeUserConfig.model_validate({"run": "latest"}).run == "latest"
    assert ServeUserConfig.model_validate({"run": "run:2@eu"}).run == "run:2@eu"
    for bad in ({"run": "../etc"}, {"run": ""}, {"runs": "latest"}, {"fallback": "base"}):
        with pytest.raises(ValueError):
            ServeUserConfig.model_validate(bad)


def test_reconfigure_switches_the_run_without_reloading_the_model(replica):
    server, store = replica
    model, fingerprint = server.core.model, server.core.fingerprint
    assert serving(server) == ("run-b", "latest")

    asyncio.run(server.reconfigure({"run": "run-a"}))  # pin a run
    assert serving(server) == ("run-a", "run-a") and server.cfg.run == "run-a"
    # A new `latest` no longer moves a pinned replica.
    store.put_text("latest", "run-b\n")
    server.core.registry.refresh()
    assert serving(server)[0] == "run-a"

    asyncio.run(server.reconfigure({}))  # nothing given: nothing changes
    assert serving(server) == ("run-a", "run-a")

    asyncio.run(server.reconfigure({"run": "latest"}))  # follow the pointer again
    assert serving(server) == ("run-b", "latest")
    assert server.core.model is model and server.core.fingerprint is fingerprint, "the model was reloaded"
    assert server.core.health()["run_switches"] >= 3


def test_reconfigure_keeps_serving_when_the_run_cannot_be_loaded(replica):
    server, _store = replica
    asyncio.run(server.reconfigure({"run": "latest"}))
    before = serving(server)[0]
    asyncio.run(server.reconfigure({"run": "no-such-run"}))
    health = server.core.health()
    assert health["run_id"] == before, "the previous run keeps serving"
    assert health["requested_run"] == "no-such-run" and health["status"] == "degraded"
    assert any("no-such-run" in p for p in health["problems"]), health["problems"]
    asyncio.run(server.reconfigure({"run": "latest"}))
    assert server.core.health()["status"] == "ok"


def test_reconfigure_refuses_unknown_settings(replica):
    server, _store = replica
    with pytest.raises(ValueError, match="runs"):
        asyncio.run(server.reconfigure({"runs": "run-a"}))
    with pytest.raises(ValueError, match="run must be"):
        asyncio.run(server.reconfigure({"run": "../x"}))


@pytest.mark.slow
def test_serve_applies_a_new_user_config_to_the_running_replica(replica, tiny_model_dir, ray_session):
    """On real Ray Serve, deployed from a config as `serve deploy` and KubeRay do: a new
    `user_config` reaches the running replica (`reconfigure`), which switches runs without being
    replaced, so without loading the model again."""

    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    _server, store = replica
    store.put_text("latest", "run-b\n")

    def config(run: str) -> ServeDeploySchema:
        return ServeDeploySchema.model_validate(
            {
                "applications": [
                    {
                        "name": "reconfigure",
                        "route_prefix": None,
                        "import_path": "chameleon.serving:app_builder",
                        # No HTTP route here; without a key the ingress refuses to start otherwise.
                        "args": {
                            "store": str(store.root),
                            "model": str(tiny_model_dir),
                            "allow_unauthenticated": True,
                        },
                        "deployments": [{"name": "ChameleonServer", "user_config": {"run": run}}],
                    }
                ]
            }
        )

    def health_when(done, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                handle = serve.get_deployment_handle("ChameleonServer", app_name="reconfigure")
                health = handle.health.remote().result(timeout_s=30)
                if done(health):
                    return health
            except Exception:  # not deployed yet
                pass
            assert time.monotonic() < deadline, "the deployment did not get there in time"
            time.sleep(0.25)

    # Serve of its own on the session's Ray: apps deployed from a config (deploy_apps) and apps
    # deployed with serve.run (test_serving) cannot share one Serve instance.
    try:
        client = serve_start(http_options={"host": "127.0.0.1", "port": 0})
        client.deploy_apps(config("run-a"))
        first = health_when(lambda h: h["run_id"] == "run-a")
        assert first["requested_run"] == "run-a"

        client.deploy_apps(config("latest"))  # only the user_config changed
        second = health_when(lambda h: h["requested_run"] == "latest")
        assert second["run_id"] == "run-b"
        # The same replica: its switch count went on (a new replica would count from scratch).
        assert second["run_switches"] == first["run_switches"] + 1
    finally:
        serve.shutdown()
