"""Offline checks of the cluster artifacts: `ray-cluster.yaml` and everything under `cluster/`.

The `ray up` config goes through Ray's own validator (the JSON schema plus the semantic checks of
`validate_config`, after `prepare_config` fills in the provider defaults as `ray up` does). The
Serve config goes through Ray Serve's own `ServeDeploySchema`. No maintained PyPI package ships
KubeRay's CRD schemas, so the KubeRay manifests are checked against the `ray.io/v1` field names of
KubeRay v1.7.0 (ray-operator/apis/ray/v1/*_types.go) and against the practices the manifests
promise: token auth, a head without CPUs for Ray, RayJob retries and deadlines, a light-weight
submitter, the API key on every serving pod. Fast, no network, no cluster.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

# Ray Serve's own models emit pydantic deprecation warnings on import; they are not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAY_UP = ROOT / "ray-cluster.yaml"
SERVE_CONFIG = CLUSTER / "serve-config.yaml"
JOB_CONFIG = CLUSTER / "job-config.example.yaml"

RAY_IMAGE = "rayproject/ray:2.60.0-py311-gpu"
S3_SECRET = "chameleon-s3"
RAY_TOKEN_SECRET = "chameleon-ray-token"
API_KEY_SECRET = "chameleon-api"
SUBMITTER_IMAGE = "quay.io/kuberay/submitter:"
KUBERAY_MANIFESTS = {
    "raycluster.yaml": "RayCluster",
    "rayjob.yaml": "RayJob",
    "rayservice.yaml": "RayService",
}

# Field names of the ray.io/v1 CRDs (KubeRay v1.7.0, ray-operator/apis/ray/v1/*_types.go; fields
# marked deprecated there are left out). A typo in a manifest (say `shutdownAfterJobFinish`) is
# otherwise dropped or refused only at `kubectl apply`.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionStrategy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "preRunningDeadlineSeconds",
    "shutdownAfterJobFinishes",
    "suspend",
}
RAYSERVICE_SPEC_FIELDS = {
    "rayClusterDeletionDelaySeconds",
    "serveService",
    "upgradeStrategy",
    "managedBy",
    "serveConfigV2",
    "rayClusterConfig",
    "excludeHeadPodFromServeSvc",
    "suspend",
}
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy",
    "authOptions",
    "suspend",
    "managedBy",
    "autoscalerOptions",
    "headServiceAnnotations",
    "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions",
    "historyServerOptions",
    "networkPolicy",
    "tlsOptions",
    "headGroupSpec",
    "rayVersion",
    "workerGroupSpecs",
}
AUTH_OPTIONS_FIELDS = {"enableK8sTokenAuth", "secretName", "mode"}
AUTOSCALER_OPTIONS_FIELDS = {
    "resources",
    "image",
    "imagePullPolicy",
    "securityContext",
    "idleTimeoutSeconds",
    "upscalingMode",
    "version",
    "env",
    "envFrom",
    "volumeMounts",
    "command",
    "args",
}
HEAD_GROUP_FIELDS = {
    "template",
    "headService",
    "enableIngress",
    "ingressOptions",
    "resources",
    "labels",
    "rayStartParams",
    "serviceType",
}
WORKER_GROUP_FIELDS = {
    "suspend",
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "idleTimeoutSeconds",
    "priority",
    "resources",
    "labels",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "numOfHosts",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def load_all(path: Path) -> list:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load_one(path: Path):
    docs = load_all(path)
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    return docs[0]


def manifest(name: str) -> dict:
    return load_one(CLUSTER / name)


def cluster_spec(doc: dict) -> dict:
    """The RayClusterSpec inside any of the three kinds."""
    spec = doc["spec"]
    return {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }[doc["kind"]]


def ray_containers(spec: dict):
    """(group name, container) for the Ray container of the head and of every worker group."""
    yield "head", spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]["containers"][0]


def pod_containers(spec: dict):
    """(group name, container) for every container of the head and worker pods."""
    for container in spec["headGroupSpec"]["template"]["spec"]["containers"]:
        yield "head", container
    for group in spec.get("workerGroupSpecs", []):
        for container in group["template"]["spec"]["containers"]:
            yield group["groupName"], container


def submitter(spec: dict) -> dict:
    """The RayJob's submitter container (light-weight submitter: `/submitter ARGS -- ENTRYPOINT`)."""
    (container,) = spec["submitterPodTemplate"]["spec"]["containers"]
    return container


def rayjob_job(spec: dict) -> tuple[dict, list[str]]:
    """(runtime env, entrypoint argv) of the Ray job the RayJob submits."""
    args = submitter(spec)["args"]
    split = args.index("--")
    options, entrypoint = args[:split], args[split + 1 :]
    runtime_env = json.loads(options[options.index("--runtime-env-json") + 1])
    return runtime_env, entrypoint


def gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def serve_schema_validate(config: dict):
    """Ray Serve's own schema check: pydantic v2 API on current Ray, v1 `parse_obj` on old Ray."""
    from ray.serve.schema import ServeDeploySchema

    if hasattr(ServeDeploySchema, "model_validate"):
        return ServeDeploySchema.model_validate(config)
    return ServeDeploySchema.parse_obj(config)  # pragma: no cover - Ray with pydantic v1 models


def ray_up_validate(config: dict) -> None:
    """What `ray up` does before launching anything: fill in defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


# --------------------------------------------------------------------------------------------
# ray-cluster.yaml (`ray up`)
# --------------------------------------------------------------------------------------------


def test_ray_up_config_passes_rays_own_validation():
    ray_up_validate(load_one(RAY_UP))


@pytest.mark.parametrize(
    "breakage, error",
    [
        (lambda c: c.__setitem__("max_workers", "ten"), "jsonschema"),
        (lambda c: c.__setitem__("head_node_type", "ray.head.missing"), ValueError),
        (
            lambda c: c["available_node_types"]["ray.worker.gpu.a10g.1x"]["resources"].__setitem__(
                "GPU", 0.5
            ),
            "jsonschema",
        ),
        (lambda c: c.__setitem__("max_worker", 3), "jsonschema"),  # unknown top-level key
    ],
    ids=["max_workers-not-int", "unknown-head-type", "fractional-gpu-resource", "unknown-key"],
)
def test_ray_up_validation_rejects_a_broken_copy(breakage, error):
    import jsonschema

    config = load_one(RAY_UP)
    breakage(config)
    expected = jsonschema.ValidationError if error == "jsonschema" else error
    with pytest.raises(expected):
        ray_up_validate(config)


def test_ray_up_node_types():
    config = load_one(RAY_UP)
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert config["auth"]["ssh_user"] == "ubuntu"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["node_config"]["InstanceType"] == "m5.2xlarge"
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"

    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    instances = {t["node_config"]["InstanceType"]: t for t in gpu_types.values()}
    assert {"g5.xlarge", "g5.12xlarge"} <= set(instances)
    assert instances["g5.xlarge"]["resources"]["GPU"] == 1
    assert instances["g5.12xlarge"]["resources"]["GPU"] == 4
    for name, t in gpu_types.items():
        assert t.get("min_workers", 0) == 0, f"{name} must scale from zero"
        assert t["max_workers"] >= 1
        assert t["max_workers"] <= config["max_workers"]


def test_ray_up_head_takes_no_ray_work_and_auth_is_on():
    config = load_one(RAY_UP)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "Ray Data tasks and Serve replicas stay off the head"
    # Token auth: every Ray process in the container runs with RAY_AUTH_MODE=token, and the token
    # file reaches every node.
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_ray_up_installs_the_project_and_starts_ray():
    config = load_one(RAY_UP)
    assert config["docker"]["image"] == RAY_IMAGE
    assert config["docker"]["container_name"]
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup
    # The project is either synced by file_mounts and installed from there, or installed from git.
    mounted = [remote for remote, local in config["file_mounts"].items() if local == "."]
    from_mount = bool(mounted) and any(remote in setup for remote in mounted)
    assert from_mount or "chameleon-on-ray @ git+" in setup
    assert any(
        "ray start --head" in c and "--autoscaling-config=~/ray_bootstrap_config.yaml" in c
        for c in config["head_start_ray_commands"]
    )
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


# --------------------------------------------------------------------------------------------
# every YAML under cluster/
# --------------------------------------------------------------------------------------------

CLUSTER_YAMLS = sorted(p for p in CLUSTER.rglob("*") if p.suffix in {".yaml", ".yml"})


def test_cluster_dir_has_the_expected_files():
    names = {p.name for p in CLUSTER_YAMLS}
    assert (
        set(KUBERAY_MANIFESTS)
        | {
            "serve-config.yaml",
            "job-config.example.yaml",
            "s3-dev.yaml",
            "model-cache.yaml",
        }
        <= names
    )
    assert (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_every_cluster_yaml_parses(path):
    docs = load_all(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: every document must be a mapping"
        if str(doc.get("apiVersion", "")).startswith("ray.io/"):
            assert doc["apiVersion"] == "ray.io/v1", f"{path.name}: use apiVersion ray.io/v1"
        if "kind" in doc:
            assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), path.name


# --------------------------------------------------------------------------------------------
# KubeRay manifests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind", sorted(KUBERAY_MANIFESTS.items()))
def test_kuberay_manifest_shape(name, kind):
    doc = manifest(name)
    assert doc["kind"] == kind
    check_kuberay_shape(doc)


@pytest.mark.parametrize(
    "name, breakage",
    [
        ("rayjob.yaml", lambda s: s.__setitem__("shutdownAfterJobFinish", s.pop("shutdownAfterJobFinishes"))),
        ("rayjob.yaml", lambda s: s.__setitem__("preRunningDeadline", s.pop("preRunningDeadlineSeconds"))),
        ("raycluster.yaml", lambda s: s["authOptions"].__setitem__("secret", "x")),
        ("rayservice.yaml", lambda s: s["rayClusterConfig"]["headGroupSpec"].__setitem__("numCpus", "0")),
        (
            "rayservice.yaml",
            lambda s: s["rayClusterConfig"]["workerGroupSpecs"][0].__setitem__("maxReplica", 4),
        ),
        ("raycluster.yaml", lambda s: s["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0)),
    ],
    ids=["rayjob-typo", "rayjob-deadline-typo", "auth-typo", "head-typo", "worker-typo", "int-param"],
)
def test_kuberay_shape_check_rejects_a_broken_copy(name, breakage):
    doc = manifest(name)
    breakage(doc["spec"])
    with pytest.raises(AssertionError):
        check_kuberay_shape(doc)


def check_kuberay_shape(doc: dict) -> None:
    """The ray.io/v1 field names (KubeRay v1.7.0) at every level the manifests set."""
    name, kind = doc["metadata"]["name"], doc["kind"]
    assert doc["apiVersion"] == "ray.io/v1"
    allowed = {
        "RayJob": RAYJOB_SPEC_FIELDS,
        "RayService": RAYSERVICE_SPEC_FIELDS,
        "RayCluster": RAYCLUSTER_SPEC_FIELDS,
    }[kind]
    assert set(doc["spec"]) <= allowed, f"unknown spec fields: {set(doc['spec']) - allowed}"

    spec = cluster_spec(doc)
    assert spec, f"{name}: no Ray cluster spec"
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, set(spec) - RAYCLUSTER_SPEC_FIELDS
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    assert set(spec.get("authOptions", {})) <= AUTH_OPTIONS_FIELDS
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS_FIELDS
    for params in [
        spec["headGroupSpec"]["rayStartParams"],
        *(g["rayStartParams"] for g in spec["workerGroupSpecs"]),
    ]:
        assert all(isinstance(v, str) for v in params.values()), f"{name}: rayStartParams values are strings"
    assert spec.get("enableInTreeAutoscaling") is True, "GPU groups start at zero: the autoscaler adds pods"
    assert gpu_limit(spec["headGroupSpec"]["template"]["spec"]["containers"][0]) == 0

    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups), "group names must be unique"
    for g in groups:
        assert set(g) <= WORKER_GROUP_FIELDS, set(g) - WORKER_GROUP_FIELDS
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], g["groupName"]
    gpu_groups = [g for g in groups if gpu_limit(g["template"]["spec"]["containers"][0]) > 0]
    assert any(g["minReplicas"] == 0 for g in gpu_groups), f"{name}: no GPU worker group scaling from zero"
    for g in gpu_groups:
        resources = g["template"]["spec"]["containers"][0]["resources"]
        requested = resources.get("requests", {}).get("nvidia.com/gpu")
        assert requested is None or str(requested) == str(resources["limits"]["nvidia.com/gpu"])


@pytest.mark.parametrize("name", sorted(KUBERAY_MANIFESTS))
def test_kuberay_images_versions_and_s3_secret(name):
    spec = cluster_spec(manifest(name))
    for group, container in ray_containers(spec):
        assert container["image"] == RAY_IMAGE, f"{name}/{group}"
        assert container["image"].split(":")[1].startswith(spec["rayVersion"] + "-"), (
            f"{name}: rayVersion {spec['rayVersion']} does not match image {container['image']}"
        )
        secrets = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert S3_SECRET in secrets, f"{name}/{group} does not read the {S3_SECRET} Secret"


@pytest.mark.parametrize("name", sorted(KUBERAY_MANIFESTS))
def test_kuberay_token_auth(name):
    # authOptions (KubeRay >= 1.6): KubeRay sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the
    # Secret in every Ray container and in the RayJob submitter; one Secret for every cluster.
    spec = cluster_spec(manifest(name))
    assert spec["authOptions"] == {"mode": "token", "secretName": RAY_TOKEN_SECRET}
    assert tuple(int(x) for x in spec["rayVersion"].split(".")) >= (2, 52, 0), "token auth needs Ray 2.52"


@pytest.mark.parametrize("name", sorted(KUBERAY_MANIFESTS))
def test_kuberay_head_takes_no_ray_work(name):
    # num-cpus "0": Ray Data tasks, the map actors and Serve replicas are placed on the workers.
    spec = cluster_spec(manifest(name))
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayservice.yaml"])
def test_serving_pods_get_the_api_key_from_a_secret(name):
    for group, container in pod_containers(cluster_spec(manifest(name))):
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "valueFrom" in e
        }
        ref = refs.get("CHAMELEON_API_KEY")
        assert ref, f"{name}/{group}: no CHAMELEON_API_KEY"
        assert ref["name"] == API_KEY_SECRET and ref["key"] == "CHAMELEON_API_KEY", ref
        # Required: without the Secret the pods do not start (never an endpoint without a key).
        assert ref.get("optional") is not True


def test_rayjob_retries_resumably_within_deadlines():
    spec = manifest("rayjob.yaml")["spec"]
    assert spec["backoffLimit"] >= 1, "a failed attempt is retried on a new cluster"
    assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    # A retry reruns the same command: a fixed run id is what makes it resume, not start over.
    _, argv = rayjob_job(spec)
    run_id = argv[argv.index("--run-id") + 1]
    assert run_id and "$" not in run_id


def test_rayjob_uses_the_light_weight_submitter():
    spec = manifest("rayjob.yaml")["spec"]
    container = submitter(spec)
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    assert container["image"].startswith(SUBMITTER_IMAGE), container["image"]
    assert container["command"] == ["/submitter"]
    requests = container["resources"]["requests"]
    assert requests["cpu"].endswith("m") and int(requests["cpu"][:-1]) <= 100
    assert requests["memory"].endswith("Mi") and int(requests["memory"][:-2]) <= 256
    # The job is given to the submitter only (no second copy in spec.entrypoint to drift from it).
    assert "entrypoint" not in spec and "runtimeEnvYAML" not in spec


def test_rayjob_runs_the_personalize_job():
    spec = manifest("rayjob.yaml")["spec"]
    runtime_env, argv = rayjob_job(spec)
    assert argv[:2] == ["python", "jobs/personalize.py"]
    flags = {a for a in argv if a.startswith("--")}
    assert {"--config", "--input", "--store", "--run-id"} <= flags
    assert argv[argv.index("--store") + 1].startswith("s3://")
    assert (ROOT / argv[argv.index("--config") + 1]).is_file(), "--config must name a file in the repo"
    # The head pod has no checkout: the working_dir must be a remote URI.
    assert re.match(r"^(https?|s3|gs)://", runtime_env["working_dir"])
    assert any("chameleon-on-ray" in p for p in runtime_env.get("pip", []))


def test_rayjob_entrypoint_parses_with_the_job_cli():
    # The RayJob runs jobs/personalize.py, which forwards its flags to `chameleon personalize`:
    # the manifest's command line must parse there, and the config it names must load.
    from chameleon.cli import build_parser
    from chameleon.flags import load_config

    _, argv = rayjob_job(manifest("rayjob.yaml")["spec"])
    assert argv[:2] == ["python", "jobs/personalize.py"]
    args = build_parser().parse_args(["personalize", *argv[2:]])
    assert args.input and args.store and args.run_id
    assert args.verbose is True, "the job's logs show its progress"
    cfg = load_config(args)
    assert cfg.model.name_or_path


# --------------------------------------------------------------------------------------------
# Model weights once: the cache volume, the Hugging Face token, the declared GPUs
# --------------------------------------------------------------------------------------------

MODEL_CACHE_PVC = "chameleon-model-cache"
MODEL_CACHE_MOUNT = "/models"
HF_SECRET = "chameleon-hf"


def pod_specs(spec: dict):
    """(group name, pod spec) of the head and of every worker group."""
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_the_model_cache_claim():
    pvc = manifest("model-cache.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == MODEL_CACHE_PVC
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "one copy shared by every pod of every node"
    assert pvc["spec"]["resources"]["requests"]["storage"]


@pytest.mark.parametrize("name", sorted(KUBERAY_MANIFESTS))
def test_every_ray_pod_mounts_the_model_cache_and_keeps_downloads_there(name):
    spec = cluster_spec(manifest(name))
    for group, pod in pod_specs(spec):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claims = [
            v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v
        ]
        assert claims == [MODEL_CACHE_PVC], f"{name}/{group}: volumes {sorted(volumes)}"
        (volume,) = [n for n, v in volumes.items() if "persistentVolumeClaim" in v]
        container = pod["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        assert mounts.get(volume) == MODEL_CACHE_MOUNT, f"{name}/{group}: {mounts}"
        env = env_of(container)
        # Hugging Face downloads and copies of s3:// mirrors both land on the shared volume.
        for var in ("HF_HOME", "CHAMELEON_CACHE"):
            assert env[var]["value"].startswith(MODEL_CACHE_MOUNT + "/"), f"{name}/{group}: {var}"


@pytest.mark.parametrize("name", sorted(KUBERAY_MANIFESTS))
def test_every_ray_pod_gets_the_hugging_face_token_from_a_secret(name):
    spec = cluster_spec(manifest(name))
    for group, container in ray_containers(spec):
        ref = env_of(container).get("HF_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        assert ref == {"name": HF_SECRET, "key": "HF_TOKEN", "optional": True}, f"{name}/{group}: {ref}"
        # Never a token written into the manifest itself.
        assert "value" not in env_of(container)["HF_TOKEN"]


@pytest.mark.parametrize("name", sorted(KUBERAY_MANIFESTS))
def test_every_ray_pod_declares_the_gpus_its_groups_can_add(name):
    # GPU groups start at zero pods and Ray 2.60's autoscaler does not tell the cluster its node
    # types: without this, `num_gpus: auto` would see no GPUs and run on the CPU.
    spec = cluster_spec(manifest(name))
    most = sum(
        g["maxReplicas"] * gpu_limit(g["template"]["spec"]["containers"][0]) for g in spec["workerGroupSpecs"]
    )
    for group, container in ray_containers(spec):
        assert env_of(container)["CHAMELEON_CLUSTER_MAX_GPUS"]["value"] == str(most), f"{name}/{group}"


def test_ray_up_declares_the_gpus_its_node_types_can_add():
    config = load_one(RAY_UP)
    most = sum(
        t.get("max_workers", 0) * t["resources"].get("GPU", 0)
        for t in config["available_node_types"].values()
    )
    assert f"--env CHAMELEON_CLUSTER_MAX_GPUS={most}" in config["docker"]["run_options"]


# --------------------------------------------------------------------------------------------
# Serve config and RayService
# --------------------------------------------------------------------------------------------


def serve_app(config: dict) -> dict:
    apps = config["applications"]
    assert len(apps) == 1
    return apps[0]


def test_serve_config_passes_ray_serves_schema():
    config = load_one(SERVE_CONFIG)
    schema = serve_schema_validate(config)
    assert schema.applications[0].import_path == "chameleon.serving:app_builder"
    by_name = {d.name: d for d in schema.applications[0].deployments}
    assert by_name["ChameleonServer"].autoscaling_config["target_ongoing_requests"] == 32
    assert by_name["ChameleonIngress"].num_replicas == 2


def test_serve_schema_rejects_a_broken_copy():
    config = load_one(SERVE_CONFIG)
    serve_app(config)["deployments"][0]["num_replicas"] = "many"
    with pytest.raises(Exception, match="num_replicas"):
        serve_schema_validate(config)


def deployments(app: dict) -> dict[str, dict]:
    return {d["name"]: d for d in app["deployments"]}


def test_serve_config_application():
    config = load_one(SERVE_CONFIG)
    app = serve_app(config)
    assert app["route_prefix"] == "/"
    assert app["import_path"] == "chameleon.serving:app_builder"
    # The run is not an arg (changing args redeploys the app and reloads the model) but the model
    # deployment's user_config, which running replicas apply in place (reconfigure).
    assert set(app["args"]) == {
        "store",
        "model",
        "api_key_env",
        "max_batch_size",
        "stream_interval_s",
    }
    assert app["args"]["api_key_env"] == "CHAMELEON_API_KEY"
    assert app["args"]["store"].startswith("s3://")
    server = deployments(app)["ChameleonServer"]
    assert "num_replicas" not in server, "the model replicas autoscale"
    scaling = server["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]
    # About one running batch per replica before the autoscaler adds one; room for a short queue.
    assert scaling["target_ongoing_requests"] == app["args"]["max_batch_size"]
    assert server["max_ongoing_requests"] > scaling["target_ongoing_requests"]
    # GPUs per replica: the app's `num_gpus: auto` (one each on a cluster with GPUs), not a
    # deployment override that would also drop the app's CPU request.
    assert "ray_actor_options" not in server and "num_gpus" not in app["args"]
    assert server["user_config"] == {"run": "latest"}
    ingress = deployments(app)["ChameleonIngress"]
    assert ingress["num_replicas"] >= 2, "no single ingress replica"
    # The ingress asks for a little CPU, so it is placed on a worker like the model (heads: num-cpus 0).
    assert ingress["ray_actor_options"]["num_cpus"] > 0
    # The server must load the model the edits were computed for: the job's model section.
    job_model = load_one(JOB_CONFIG)["model"]
    assert app["args"]["model"]["name_or_path"] == job_model["name_or_path"]
    assert app["args"]["model"]["dtype"] == job_model["dtype"]
    assert app["args"]["model"]["device_map"] == job_model["device_map"], "loaded as the job loads it"
    # The args and the user_config are what the app validates (ServeConfig, ServeUserConfig).
    from chameleon.serving.config import ServeConfig, ServeUserConfig

    cfg = ServeConfig.model_validate(app["args"])
    assert cfg.model.name_or_path == job_model["name_or_path"]
    assert ServeUserConfig.model_validate(server["user_config"]).run == "latest"


def test_serve_config_timeouts_and_logs():
    config = load_one(SERVE_CONFIG)
    assert 60 <= config["http_options"]["request_timeout_s"] <= 3600
    logging_config = serve_app(config)["logging_config"]
    assert logging_config["encoding"] == "JSON" and logging_config["enable_access_log"] is True
    schema = serve_schema_validate(config)
    assert schema.http_options.request_timeout_s == config["http_options"]["request_timeout_s"]
    assert schema.applications[0].logging_config.encoding == "JSON"


def test_serve_user_config_rejects_a_typo():
    from chameleon.serving.config import ServeUserConfig

    with pytest.raises(ValueError):
        ServeUserConfig.model_validate({"runs": "latest"})


def test_rayservice_serves_the_serve_config_application():
    spec = manifest("rayservice.yaml")["spec"]
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML string"
    embedded = yaml.safe_load(spec["serveConfigV2"])
    serve_schema_validate(embedded)

    # KubeRay pods start from Ray's image, so the embedded app also installs the package; apart
    # from that runtime_env it is the same application as serve-config.yaml.
    embedded_app = serve_app(embedded)
    runtime_env = embedded_app.pop("runtime_env", {})
    assert any("chameleon-on-ray" in p for p in runtime_env.get("pip", [])), runtime_env
    assert embedded == load_one(SERVE_CONFIG)

    # Traffic only to the workers' proxies: the head runs no replicas.
    assert spec["excludeHeadPodFromServeSvc"] is True
    # The GPU group can hold every Serve replica.
    deployment = deployments(embedded_app)["ChameleonServer"]
    gpus = sum(
        g["maxReplicas"] * gpu_limit(g["template"]["spec"]["containers"][0])
        for g in spec["rayClusterConfig"]["workerGroupSpecs"]
    )
    most = deployment["autoscaling_config"]["max_replicas"]
    assert gpus >= most * 1, "num_gpus auto: one GPU per replica"


# --------------------------------------------------------------------------------------------
# job config example and dev S3
# --------------------------------------------------------------------------------------------


def test_job_config_example_has_the_documented_keys():
    config = load_one(JOB_CONFIG)
    expected = {
        "model": {"name_or_path", "dtype", "device_map"},
        "synth": {
            "pair_source",
            "history_k",
            "pairs_per_user",
            "answer_max_new_tokens",
            "batch_size",
            "seed",
        },
        "subspace": {"site", "n_layers"},
        "edit": {"form", "calibrate"},
        "groups": {"n_groups", "min_group_size", "features"},
        "job": {"num_actors", "num_gpus_per_actor", "users_per_partition"},
    }
    assert {k: set(v) for k, v in config.items()} == expected


def test_job_config_example_sets_the_method_to_its_defaults():
    """The example's method settings are the defaults the results were measured with (an example
    that set another method, say projection edits on the MLP, would be run by people copying it)."""
    from chameleon.config import ChameleonConfig

    config, defaults = load_one(JOB_CONFIG), ChameleonConfig()
    ChameleonConfig.model_validate(config)  # a valid config as a whole
    for section in ("synth", "subspace", "edit", "groups"):
        for key, value in config.get(section, {}).items():
            assert value == getattr(getattr(defaults, section), key), f"{section}.{key}: {value!r}"


def test_s3_dev_server_and_secret():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in load_all(CLUSTER / "s3-dev.yaml")}
    for (kind, name), doc in docs.items():
        assert doc["metadata"]["labels"].get("chameleon.dev/dev-only") == "true", f"{kind}/{name}"

    secret = docs[("Secret", S3_SECRET)]["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "CHAMELEON_S3_ENDPOINT"} <= set(
        secret
    )
    assert secret["AWS_ENDPOINT_URL"] == secret["CHAMELEON_S3_ENDPOINT"]

    deployments = [d for (kind, _), d in docs.items() if kind == "Deployment"]
    services = [d for (kind, _), d in docs.items() if kind == "Service"]
    assert len(deployments) == 1 and len(services) == 1
    pod = deployments[0]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["image"].startswith("chrislusf/seaweedfs")
    args = container["args"]
    assert args[0] == "mini" or (args[0] == "server" and "-s3" in args)
    keys = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]}
    assert keys == {"AWS_ACCESS_KEY_ID": S3_SECRET, "AWS_SECRET_ACCESS_KEY": S3_SECRET}

    # The endpoint in the Secret is this Service.
    service = services[0]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    port = service["spec"]["ports"][0]["port"]
    assert secret["AWS_ENDPOINT_URL"] == f"http://{service['metadata']['name']}:{port}"
    bucket = next(a.split("=", 1)[1] for a in args if a.startswith("-bucket="))
    assert load_one(SERVE_CONFIG)["applications"][0]["args"]["store"].startswith(f"s3://{bucket}/")


def test_one_ray_image_everywhere():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(RAY_IMAGE)}\s*$", dockerfile, re.M)
    assert load_one(RAY_UP)["docker"]["image"] == RAY_IMAGE
