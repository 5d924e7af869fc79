"""``k8s/``: every manifest parses, pod templates are valid Kubernetes, KubeRay fields exist.

Kubernetes cannot run here, so the manifests are checked statically, against
the two authorities that would reject them:

- the Kubernetes API's own models (the ``kubernetes`` client): every pod
  template deserializes into ``V1PodTemplateSpec`` and serializes back to the
  same dict, so no field is unknown, misplaced or of the wrong type;
- KubeRay's CRDs (``tests/fixtures/kuberay``, trimmed copies of the
  ``ray.io/v1`` openAPIV3Schema): every key path of the RayCluster and RayJob
  outside the pod templates exists there with the right type.

Then hemaray's own rules: non-root, read-only root filesystem, requests and
limits, credentials only from Secrets, a CPU head, a GPU group, a RayJob that
``hemaray run`` itself would accept, and one Ray version everywhere.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from kubernetes import client as k8s

from batch.cluster.submit import SECRET_ENV_PATTERN, strip_secret_env

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRDS = Path(__file__).resolve().parent / "fixtures" / "kuberay"
MANIFESTS = ("raycluster.yaml", "rayjob.yaml", "configmap.yaml", "secret.example.yaml")
POD_TEMPLATE = "pod template"
INT32 = (-(2**31), 2**31 - 1)
#: Variables every Ray container needs: storage endpoint and credentials, Ray auth.
RAY_ENV = {"HEMARAY_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
#: Variables that may only come from a Secret.
SECRET_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"}


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]


def _one(name: str) -> dict[str, Any]:
    (doc,) = _docs(name)
    return doc


def _crd_schema(name: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / name).read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema: dict[str, Any] = v1["schema"]["openAPIV3Schema"]
    return schema


class Walk:
    """Walk a manifest through an openAPIV3Schema; collect errors and the pod templates met."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.templates: dict[str, dict[str, Any]] = {}

    def __call__(self, value: Any, schema: dict[str, Any], path: str) -> None:
        trimmed = schema.get("x-hemaray-trimmed")
        if trimmed is not None:
            if str(trimmed).startswith(POD_TEMPLATE):
                self.templates[path] = value
            else:
                self.errors.append(f"{path}: enters a part of the vendored CRD that was trimmed ({trimmed})")
            return
        if "anyOf" in schema and schema.get("x-kubernetes-int-or-string"):
            if not isinstance(value, (int, str)) or isinstance(value, bool):
                self.errors.append(f"{path}: expected an int or a string, got {value!r}")
            return
        kind = schema.get("type")
        if kind == "object":
            self._object(value, schema, path)
        elif kind == "array":
            if not isinstance(value, list):
                self.errors.append(f"{path}: expected a list, got {value!r}")
                return
            for i, item in enumerate(value):
                self(item, schema["items"], f"{path}[{i}]")
        elif kind == "string":
            if not isinstance(value, str):
                self.errors.append(f"{path}: expected a string, got {value!r} ({type(value).__name__})")
            elif "enum" in schema and value not in schema["enum"]:
                self.errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
        elif kind == "integer":
            if not isinstance(value, int) or isinstance(value, bool):
                self.errors.append(f"{path}: expected an integer, got {value!r}")
            elif schema.get("format") == "int32" and not INT32[0] <= value <= INT32[1]:
                self.errors.append(f"{path}: {value} does not fit int32")
            elif "minimum" in schema and value < schema["minimum"]:
                self.errors.append(f"{path}: {value} < minimum {schema['minimum']}")
        elif kind == "number":
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                self.errors.append(f"{path}: expected a number, got {value!r}")
        elif kind == "boolean":
            if not isinstance(value, bool):
                self.errors.append(f"{path}: expected true/false, got {value!r}")
        else:
            self.errors.append(f"{path}: schema has no type the walker knows ({kind!r})")

    def _object(self, value: Any, schema: dict[str, Any], path: str) -> None:
        if not isinstance(value, dict):
            self.errors.append(f"{path}: expected a mapping, got {value!r}")
            return
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, item in value.items():
            where = f"{path}.{key}"
            if props is not None and key in props:
                self(item, props[key], where)
            elif extra is not None:
                self(item, extra, where)
            elif props is not None:
                self.errors.append(f"{where}: unknown field; the CRD has {sorted(props)}")
        for key in schema.get("required", []):
            if key not in value:
                self.errors.append(f"{path}: missing required field {key!r}")


def _walk(manifest: dict[str, Any], crd: str) -> Walk:
    walk = Walk()
    walk(manifest, _crd_schema(crd), manifest["kind"])
    return walk


def _api() -> k8s.ApiClient:
    return k8s.ApiClient()


def _roundtrip(data: dict[str, Any], model: str) -> Any:
    """Deserialize into a Kubernetes model and require the same dict back (nothing dropped)."""
    api = _api()
    obj = api._ApiClient__deserialize(data, model)  # type: ignore[attr-defined]
    back = api.sanitize_for_serialization(obj)
    assert back == data, f"{model} dropped or changed fields:\nin:  {data}\nout: {back}"
    return obj


def _pod_templates() -> Iterator[tuple[str, dict[str, Any]]]:
    yield from _walk(_one("raycluster.yaml"), "ray.io_rayclusters.yaml").templates.items()
    yield from _walk(_one("rayjob.yaml"), "ray.io_rayjobs.yaml").templates.items()


POD_TEMPLATES = dict(_pod_templates())


def test_every_manifest_parses() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for name in MANIFESTS for d in _docs(name))
    assert kinds == [
        ("ConfigMap", "hemaray-storage"), ("RayCluster", "hemaray"), ("RayJob", "hemaray-cohort"),
        ("Secret", "hemaray-ray-auth"), ("Secret", "hemaray-s3-credentials"),
    ]  # fmt: skip
    for name in MANIFESTS:
        for doc in _docs(name):
            _roundtrip(doc["metadata"], "V1ObjectMeta")


@pytest.mark.parametrize(("manifest", "crd"), [("raycluster.yaml", "ray.io_rayclusters.yaml"), ("rayjob.yaml", "ray.io_rayjobs.yaml")])
def test_kuberay_fields_exist_in_the_crds(manifest: str, crd: str) -> None:
    doc = _one(manifest)
    assert doc["apiVersion"] == "ray.io/v1"
    walk = _walk(doc, crd)
    assert walk.errors == []


def test_the_walker_catches_mistakes() -> None:
    doc = _one("raycluster.yaml")
    bad = {**doc, "spec": {**doc["spec"], "workerGroupSpecs": [dict(g) for g in doc["spec"]["workerGroupSpecs"]]}}
    group = bad["spec"]["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")  # a typo, and a required field gone
    group["rayStartParams"] = {"num-gpus": 1}  # must be a string
    bad["spec"]["autoscalerOptions"] = {**doc["spec"]["autoscalerOptions"], "upscalingMode": "Fast"}
    bad["spec"]["gcsFaultToleranceOptions"] = {"redisAddress": "x"}  # a trimmed subtree
    errors = "\n".join(_walk(bad, "ray.io_rayclusters.yaml").errors)
    for expected in ("minReplica: unknown field", "missing required field 'minReplicas'",
                     "num-gpus: expected a string", "'Fast' is not one of", "trimmed"):  # fmt: skip
        assert expected in errors


def test_pod_templates_found() -> None:
    assert sorted(POD_TEMPLATES) == [
        "RayCluster.spec.headGroupSpec.template",
        "RayCluster.spec.workerGroupSpecs[0].template",
        "RayCluster.spec.workerGroupSpecs[1].template",
        "RayJob.spec.submitterPodTemplate",
    ]


@pytest.mark.parametrize("path", sorted(POD_TEMPLATES))
def test_pod_templates_are_valid_kubernetes(path: str) -> None:
    template = _roundtrip(POD_TEMPLATES[path], "V1PodTemplateSpec")
    assert template.spec.containers


def test_configmap_and_secret_example() -> None:
    config = _roundtrip(_one("configmap.yaml"), "V1ConfigMap")
    assert not [k for k in config.data if SECRET_ENV_PATTERN.search(k)]
    assert config.data["HEMARAY_S3_ENDPOINT"].startswith(("http://", "https://"))
    for doc in _docs("secret.example.yaml"):
        secret = _roundtrip(doc, "V1Secret")
        assert secret.string_data and all(v.startswith("REPLACE") for v in secret.string_data.values())
    keys = {k for d in _docs("secret.example.yaml") for k in d["stringData"]}
    assert keys == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "auth_token"}


def _containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for path, template in POD_TEMPLATES.items():
        for c in template["spec"]["containers"]:
            yield f"{path}/{c['name']}", c, template["spec"]


@pytest.mark.parametrize("where", [w for w, _, _ in _containers()])
def test_containers_are_non_root_read_only_and_bounded(where: str) -> None:
    _, c, pod = next(x for x in _containers() if x[0] == where)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0 and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][part]), where
    # Ray and Python need a writable /tmp and home: emptyDir volumes over a read-only root.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    assert "emptyDir" in mounts["/tmp"] and "emptyDir" in mounts["/home/ray"]
    for env in c["env"]:
        if env["name"] in SECRET_VARS:
            assert "secretKeyRef" in env.get("valueFrom", {}), f"{where}: {env['name']} must come from a Secret"
    assert not any(SECRET_ENV_PATTERN.search(e["name"]) and "value" in e for e in c["env"]), where


def test_ray_pods_get_storage_and_auth_from_config_and_secrets() -> None:
    images = set()
    for where, c, _ in _containers():
        images.add(c["image"])
        if "RayCluster" in where:
            assert {e["name"] for e in c["env"]} >= RAY_ENV, where
    assert len(images) == 1  # one image for head, workers and the submitter
    autoscaler = _one("raycluster.yaml")["spec"]["autoscalerOptions"]
    _roundtrip(autoscaler["securityContext"], "V1SecurityContext")
    _roundtrip(autoscaler["resources"], "V1ResourceRequirements")
    for env in autoscaler["env"]:
        _roundtrip(env, "V1EnvVar")
    assert autoscaler["securityContext"]["runAsNonRoot"] is True
    # No literal credential anywhere but the placeholder Secret.
    for name in ("raycluster.yaml", "rayjob.yaml", "configmap.yaml"):
        text = (K8S / name).read_text()
        assert not re.search(r"(AWS_SECRET_ACCESS_KEY|auth_token)\s*:\s*\S", text), name


def test_cluster_layout_cpu_head_gpu_group_autoscaling() -> None:
    spec = _one("raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    gpu_pod = groups["gpu"]["template"]["spec"]
    resources = gpu_pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert gpu_pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"])
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_rayjob_runs_hemaray_on_the_cluster() -> None:
    from batch.cli import build_parser

    job = _one("rayjob.yaml")["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": _one("raycluster.yaml")["metadata"]["name"]}
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["hemaray", "run"]
    args = build_parser().parse_args(argv[1:])  # hemaray run itself accepts it
    assert all(s.startswith("s3://") for s in args.slides) and args.out.startswith("s3://")
    assert args.endpoint_url == "$HEMARAY_S3_ENDPOINT"  # expanded by the shell on the cluster
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert strip_secret_env(runtime_env.get("env_vars", {}))[1] == []
    submitter_env = {e["name"] for e in job["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "HEMARAY_S3_ENDPOINT"} <= submitter_env


def test_dockerfile_non_root_no_credentials_one_ray_version() -> None:
    text = (K8S / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert any(ln.startswith("FROM ") for ln in lines)
    user = [ln for ln in lines if ln.startswith("USER ")][-1]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))
    uid = user.split()[1].split(":")[0]
    uid = args.get(uid.strip("${}"), uid)
    assert uid.isdigit() and int(uid) > 0, user
    for name in re.findall(r"^(?:ARG|ENV)\s+(\w+)", text, re.MULTILINE) + re.findall(r"^\s+(\w+)=", text, re.MULTILINE):
        assert not SECRET_ENV_PATTERN.search(name), f"Dockerfile sets {name}"
    assert "wget" in text  # KubeRay's probes
    ray_version = args["RAY_VERSION"]
    assert ray_version == _one("raycluster.yaml")["spec"]["rayVersion"] == ray.__version__
    ignore = (K8S / "Dockerfile.dockerignore").read_text()
    assert "!batch/" in ignore and ".venv" not in ignore.replace("!", "")


def test_the_roundtrip_catches_mistakes() -> None:
    import copy

    template = copy.deepcopy(POD_TEMPLATES["RayCluster.spec.headGroupSpec.template"])
    container = template["spec"]["containers"][0]
    container["securityContex"] = container.pop("securityContext")  # a typo Kubernetes would drop
    with pytest.raises(AssertionError, match="dropped or changed"):
        _roundtrip(template, "V1PodTemplateSpec")
    template = copy.deepcopy(POD_TEMPLATES["RayCluster.spec.headGroupSpec.template"])
    template["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] = 20  # quantities are strings
    with pytest.raises((AssertionError, ValueError)):  # the client's models validate types
        _roundtrip(template, "V1PodTemplateSpec")
