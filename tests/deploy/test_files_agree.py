"""Settings that several deployment files (and the app) must agree on: the user, the port and
probes, the health check, the model repository, every setting's value, and stop budgets long
enough for the app's drain; KServe's predictor is the Deployment's pod."""

from __future__ import annotations

import math
from typing import Any

from deploy_support import KUBERNETES, Image, load_yaml, seconds, validate_kubernetes
from pydantic import TypeAdapter
from support import ROOT


def test_image_runs_as_the_numeric_non_root_user_of_the_kubernetes_manifests(
    image: Image, base_manifests: dict[str, dict[str, Any]]
) -> None:
    user, _, group = image.one("USER").partition(":")
    assert user.isdigit(), "USER must be numeric for runAsNonRoot to verify it"
    assert int(user) != 0, "USER must be numeric for runAsNonRoot to verify it"
    pod = base_manifests["Deployment"]["spec"]["template"]["spec"]
    kserve_pod = load_yaml(KUBERNETES / "kserve" / "inferenceservice.yaml")[0]["spec"]["predictor"]
    for security in (pod["securityContext"], kserve_pod["securityContext"]):
        assert security["runAsNonRoot"] is True
        assert (security["runAsUser"], security["runAsGroup"]) == (int(user), int(group or user))


def test_compose_spells_out_every_setting_at_the_app_or_image_default(
    compose: dict[str, Any], image: Image
) -> None:
    from app.config import Settings

    environment = compose["services"]["evalserve"]["environment"]
    # Settings whose default is "unset" (torch_threads, api_keys) stay unset: no value says that.
    fields = {
        f"EVALSERVE_{name.upper()}": field
        for name, field in Settings.model_fields.items()
        if field.default is not None
    }
    assert set(fields) <= set(environment), sorted(set(fields) - set(environment))
    for key, field in fields.items():
        if key in image.env:
            assert environment[key] == image.env[key], f"{key}: compose and image disagree"
        else:
            assert field.annotation is not None, key
            value = TypeAdapter(field.annotation).validate_python(environment[key])
            assert value == field.default, f"{key}={environment[key]}, default {field.default}"


def test_compose_healthcheck_is_the_image_healthcheck(
    compose: dict[str, Any], image: Image
) -> None:
    options, command = image.healthcheck
    healthcheck = compose["services"]["evalserve"]["healthcheck"]
    assert healthcheck["test"] == ["CMD", *command]
    for key in ("interval", "timeout", "start_period"):
        assert seconds(healthcheck[key]) == options[key.replace("_", "-")], key
    assert healthcheck["retries"] == options["retries"]


def test_compose_mounts_the_model_repository_where_the_image_reads_it(
    compose: dict[str, Any], image: Image
) -> None:
    repository = compose["services"]["evalserve"]["environment"]["EVALSERVE_MODEL_REPOSITORY"]
    assert repository == image.env["EVALSERVE_MODEL_REPOSITORY"]
    volumes = [v.split(":") for v in compose["services"]["evalserve"]["volumes"]]
    assert [str(ROOT / "models"), repository, "ro"] in volumes, volumes


def longest_clean_stop(env: dict[str, str]) -> float:
    """Seconds from SIGTERM to exit at worst, under the settings in env or their defaults: the
    drain (at least its delay, at most its timeout), then uvicorn's graceful shutdown for
    stragglers (the request timeout, rounded up)."""
    from app.config import Settings

    def value(name: str) -> float:
        default = Settings.model_fields[name].default
        return float(env.get(f"EVALSERVE_{name.upper()}", default))

    drain = max(value("drain_delay_s"), value("drain_timeout_s"))
    return drain + math.ceil(value("request_timeout_s"))


def test_compose_stop_grace_period_outlasts_drain_and_request_timeout(
    compose: dict[str, Any],
) -> None:
    service = compose["services"]["evalserve"]
    stop = longest_clean_stop(service["environment"])
    assert seconds(service["stop_grace_period"]) >= stop + 10, (service["stop_grace_period"], stop)


def grace_budget(pod: dict[str, Any]) -> tuple[int, float, float]:
    """(terminationGracePeriodSeconds, preStop pause, longest clean stop) of a pod spec."""
    [container] = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    assert len(command) == 2, command
    env = {e["name"]: e["value"] for e in container["env"]}
    return pod["terminationGracePeriodSeconds"], float(command[1]), longest_clean_stop(env)


def test_termination_grace_outlasts_prestop_pause_drain_and_request_timeout(
    base_manifests: dict[str, dict[str, Any]],
) -> None:
    pod = base_manifests["Deployment"]["spec"]["template"]["spec"]
    grace, pause, drain = grace_budget(pod)
    assert grace > pause + drain, (grace, pause, drain)
    [container] = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert {"name": mounts["/tmp"], "emptyDir": {"sizeLimit": "256Mi"}} in pod["volumes"]


def app_routes() -> set[str]:
    from support import make_settings

    from app.main import create_app

    paths: dict[str, Any] = create_app(make_settings()).openapi()["paths"]
    return set(paths)


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


def probes(container: dict[str, Any]) -> dict[str, tuple[str, int]]:
    return {
        kind: (
            container[kind]["httpGet"]["path"],
            resolve_port(container, container[kind]["httpGet"]["port"]),
        )
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }


def test_deployment_probes_hit_the_app_health_routes_on_the_image_port(
    base_manifests: dict[str, dict[str, Any]], image: Image
) -> None:
    [container] = base_manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    port, grpc_port = map(int, image.one("EXPOSE").split())
    assert probes(container) == {
        "startupProbe": ("/health/ready", port),
        "readinessProbe": ("/health/ready", port),
        "livenessProbe": ("/health/live", port),
    }
    assert {"/health/ready", "/health/live"} <= app_routes()
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["EVALSERVE_PORT"] == str(port)
    assert env["EVALSERVE_HOST"] == "0.0.0.0"
    assert env["EVALSERVE_MODEL_REPOSITORY"] == image.env["EVALSERVE_MODEL_REPOSITORY"]
    assert env["EVALSERVE_GRPC_PORT"] == str(grpc_port)
    service = base_manifests["Service"]
    http, grpc = service["spec"]["ports"]
    assert resolve_port(container, http["targetPort"]) == port
    assert resolve_port(container, grpc["targetPort"]) == grpc_port
    assert grpc["appProtocol"] == "grpc"
    scrape = base_manifests["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert scrape["prometheus.io/path"] in app_routes()
    assert int(scrape["prometheus.io/port"]) == port


# Fields of a KServe component spec that are not PodSpec fields (serving.kserve.io/v1beta1).
KSERVE_COMPONENT_FIELDS = {
    "minReplicas",
    "maxReplicas",
    "scaleMetric",
    "scaleTarget",
    "containerConcurrency",
    "timeout",
    "canaryTrafficPercent",
    "logger",
    "batcher",
}


def test_kserve_predictor_runs_the_deployment_image_with_the_same_probes_and_stop(
    base_manifests: dict[str, dict[str, Any]], image: Image
) -> None:
    [service] = load_yaml(KUBERNETES / "kserve" / "inferenceservice.yaml")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    predictor = service["spec"]["predictor"]
    [container] = predictor["containers"]
    deployment_pod = base_manifests["Deployment"]["spec"]["template"]["spec"]
    [deployed] = deployment_pod["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"] == deployed["image"]
    # One port: Knative (KServe's serverless mode) allows no more; gRPC goes through the
    # serving runtime (clusterservingruntime.yaml) instead.
    assert [p["containerPort"] for p in container["ports"]] == [int(image.one("EXPOSE").split()[0])]
    assert probes(container) == probes(deployed)
    # Knative (KServe's serverless mode) refuses a probe port other than the container port.
    assert all(isinstance(container[k]["httpGet"]["port"], int) for k in probes(container))
    without_grpc = [e for e in deployed["env"] if e["name"] != "EVALSERVE_GRPC_PORT"]
    assert [e for e in container["env"] if e["name"] != "EVALSERVE_GRPC_PORT"] == without_grpc
    assert {"name": "EVALSERVE_GRPC_PORT", "value": "0"} in container["env"]
    assert grace_budget(predictor) == grace_budget(deployment_pod)
    # kubernetes-validate has no KServe schema; what is left of the predictor is a PodSpec.
    pod_spec = {k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_FIELDS}
    validate_kubernetes(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_spec}
    )
