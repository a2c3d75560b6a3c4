"""deploy/kubernetes: valid Kubernetes objects, wired to the gateway they run.

No cluster runs where the tests run. Every manifest is validated offline
against the Kubernetes API's JSON schemas (the ``kubernetes-validate``
package ships them), strictly, so an unknown or misspelt field fails too;
then the wiring between the objects and the gateway is checked against the
code itself: the probes hit routes of ``deltagw.routes.ROUTES``, every
environment name is a setting ``deltagw.config`` knows (and every value
parses), the ports line up with PORT, REDIS_URL names the Redis Service, and
the termination grace period covers the preStop pause plus SHUTDOWN_GRACE.
"""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from deltagw.config import SETTINGS, load_settings
from deltagw.routes import ROUTES_BY_NAME
from tests.system.test_docker import instructions

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = KUBERNETES / "kustomization.yaml"
MANIFESTS = sorted(p for p in KUBERNETES.glob("*.yaml") if p != KUSTOMIZATION)

VERSIONS = (kubernetes_validate.all_versions()[0], kubernetes_validate.latest_version())
"""The oldest and the newest Kubernetes whose schemas the pinned package ships."""

SETTING_NAMES = frozenset(setting.env for setting in SETTINGS)


def _objects() -> list[tuple[str, dict[str, Any]]]:
    """Every object of every manifest, with the file it came from."""
    found = []
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                found.append((path.name, document))
    return found


OBJECTS = _objects()


def _one(kind: str, name: str) -> dict[str, Any]:
    (match,) = [o for _, o in OBJECTS if o["kind"] == kind and o["metadata"]["name"] == name]
    return match


def _gateway() -> dict[str, Any]:
    return _one("Deployment", "deltagw")


def _redis() -> dict[str, Any]:
    return _one("Deployment", "redis")


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _configmap() -> dict[str, str]:
    """The ConfigMap the gateway container takes its environment from."""
    (source,) = _container(_gateway())["envFrom"]
    return _one("ConfigMap", source["configMapRef"]["name"])["data"]


def _environment() -> dict[str, str]:
    """The gateway container's environment: the ConfigMap, then its own env."""
    env = dict(_configmap())
    for entry in _container(_gateway()).get("env", []):
        env[entry["name"]] = entry.get("value", "")
    return env


def _target_port(service: dict[str, Any], deployment: dict[str, Any]) -> int:
    """The container port the Service's single port reaches (by name or number)."""
    (port,) = service["spec"]["ports"]
    target = port.get("targetPort", port["port"])
    if isinstance(target, int):
        return target
    (named,) = [p["containerPort"] for p in _container(deployment)["ports"] if p.get("name") == target]
    return named


def _selects(selector: dict[str, str], deployment: dict[str, Any]) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return bool(selector) and selector.items() <= labels.items()


def test_the_manifests_hold_the_objects_operators_apply() -> None:
    """A gateway Deployment, Service, ConfigMap, PDB and HPA, and Redis's Deployment and Service."""
    kinds = {(o["kind"], o["metadata"]["name"]) for _, o in OBJECTS}
    assert {
        ("Deployment", "deltagw"),
        ("Service", "deltagw"),
        ("ConfigMap", "deltagw"),
        ("PodDisruptionBudget", "deltagw"),
        ("HorizontalPodAutoscaler", "deltagw"),
        ("Deployment", "redis"),
        ("Service", "redis"),
    } <= kinds


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "source, manifest", OBJECTS, ids=[f"{f}:{o['kind']}/{o['metadata']['name']}" for f, o in OBJECTS]
)
def test_every_object_is_valid_against_the_kubernetes_schema(
    source: str, manifest: dict[str, Any], version: str
) -> None:
    """Strict schema validation: a wrong type, a missing required field or an
    unknown field (a typo) fails; so does a kind the schemas do not know."""
    problem = None
    try:
        kubernetes_validate.validate(manifest, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(part) for part in e.path)
        problem = f"{source}: {manifest['kind']} at {path}: {e.message}"
    except kubernetes_validate.SchemaNotFoundError as e:
        problem = f"{source}: {e.message}"
    assert problem is None, problem


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: _container(d)["ports"][0].update(containerPort="8000"),
        lambda d: _container(d)["livenessProbe"].update(httpGett={"path": "/health"}),
        lambda d: d["spec"].pop("selector"),
    ],
    ids=["port-as-string", "misspelt-field", "missing-selector"],
)
def test_the_validator_rejects_a_broken_deployment(mutate: Any) -> None:
    """The schema check above is not vacuous: broken copies of the Deployment fail it."""
    broken = copy.deepcopy(_gateway())
    mutate(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    """`kubectl apply -k` applies exactly the files here, and swaps the gateway's image."""
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]
    image_names = {image["name"] for image in kustomization["images"]}
    assert _container(_gateway())["image"].rsplit(":", 1)[0] in image_names


def test_probes_hit_the_gateways_health_routes() -> None:
    """Liveness (and start-up) on /health, readiness on /health/ready: GET routes of the table."""
    container = _container(_gateway())
    ports = {p["name"] for p in container["ports"]}
    expected = {
        "startupProbe": ROUTES_BY_NAME["health"],
        "livenessProbe": ROUTES_BY_NAME["health"],
        "readinessProbe": ROUTES_BY_NAME["health_ready"],
    }
    for probe, route in expected.items():
        get = container[probe]["httpGet"]
        assert route.method == "GET"
        assert get["path"] in route.public_paths, (probe, get["path"])
        assert get["port"] in ports or get["port"] == container["ports"][0]["containerPort"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"


def test_the_container_listens_on_the_configmaps_port() -> None:
    """containerPort is PORT (a plain port number) and the Service reaches it."""
    port = _configmap()["PORT"]
    assert port.isdigit(), f"PORT={port!r}: the manifests need a plain port number"
    (container_port,) = _container(_gateway())["ports"]
    assert container_port["containerPort"] == int(port)

    service = _one("Service", "deltagw")
    assert _selects(service["spec"]["selector"], _gateway())
    assert _target_port(service, _gateway()) == int(port)


def test_every_environment_name_is_a_setting_and_every_value_parses() -> None:
    """The ConfigMap (and any env) uses only names deltagw.config knows, with valid values."""
    env = _environment()
    assert set(env) <= SETTING_NAMES, sorted(set(env) - SETTING_NAMES)
    settings = load_settings(env)
    assert settings.workers == 1


def test_redis_url_names_the_redis_service() -> None:
    """REDIS_URL's host and port are the Redis Service's, which reaches the Redis container."""
    url = urlsplit(_configmap()["REDIS_URL"])
    service = _one("Service", "redis")
    (port,) = service["spec"]["ports"]
    assert url.scheme == "redis"
    assert url.hostname == service["metadata"]["name"]
    assert (url.port or 6379) == port["port"]
    assert _selects(service["spec"]["selector"], _redis())
    assert _target_port(service, _redis()) == 6379


def test_redis_admits_only_the_gateway() -> None:
    """Redis has no password, so its NetworkPolicy lets only the gateway pods in."""
    policy = _one("NetworkPolicy", "redis")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], _redis())
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert _selects(source["podSelector"]["matchLabels"], _gateway())
    assert not _selects(source["podSelector"]["matchLabels"], _redis())


def test_trusted_proxies_is_a_private_pod_range() -> None:
    """TRUSTED_PROXIES is set (X-Forwarded-For from the ingress is believed) to private CIDRs."""
    networks = load_settings(_environment()).trusted_proxies
    assert networks
    for network in networks:
        assert network.is_private and network != ipaddress.ip_network("0.0.0.0/0")


def test_grace_period_covers_prestop_and_shutdown_grace() -> None:
    """SIGTERM comes after the preStop pause, and the drain may take SHUTDOWN_GRACE:
    the kubelet's SIGKILL must come later than both."""
    spec = _gateway()["spec"]["template"]["spec"]
    command = _container(_gateway())["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    pause = float(command[1])
    assert pause > 0
    grace = load_settings(_environment()).shutdown_grace
    assert grace > 0
    assert spec["terminationGracePeriodSeconds"] > pause + grace


def test_pods_run_as_the_images_user_on_a_read_only_root() -> None:
    """Non-root (the Dockerfile's uid), no privilege escalation, no capabilities, a
    read-only root filesystem with an emptyDir for /tmp; requests and limits on
    every container."""
    (user,) = [rest for keyword, rest in instructions() if keyword == "USER"]
    uid = int(user.split(":")[0])
    pod = _gateway()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid != 0
    assert pod["automountServiceAccountToken"] is False

    for deployment in (_gateway(), _redis()):
        pod = deployment["spec"]["template"]["spec"]
        container = _container(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        assert {m["name"] for m in container["volumeMounts"]} <= empty_dirs
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), (deployment, kind)

    mounts = {m["mountPath"] for m in _container(_gateway())["volumeMounts"]}
    assert "/tmp" in mounts


def test_the_autoscaler_owns_the_replica_count() -> None:
    """The HPA scales the gateway Deployment on CPU (which has a CPU request to
    measure against); the Deployment names no replica count of its own; the
    PDB always leaves a pod to evict at the HPA's minimum."""
    hpa = _one("HorizontalPodAutoscaler", "deltagw")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", _gateway()["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert "cpu" in _container(_gateway())["resources"]["requests"]
    assert "replicas" not in _gateway()["spec"]

    minimum = hpa["spec"]["minReplicas"]
    assert minimum >= 2
    pdb = _one("PodDisruptionBudget", "deltagw")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], _gateway())
    assert 1 <= pdb["spec"]["minAvailable"] < minimum
