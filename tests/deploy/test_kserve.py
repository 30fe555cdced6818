"""KServe: the evalserve ClusterServingRuntime, the InferenceService that uses it by model format,
and the custom-predictor InferenceService, validated against KServe's own CRD schemas (v0.20.0,
committed under schemas/) and checked against the app: settings that exist, ports that match,
the base Deployment's image, probes and stop budget, /mnt/models as the model repository, and a
model format the runtime serves. Nothing here has run on a cluster."""

from __future__ import annotations

import copy
import math
import re
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from deploy_support import KUBERNETES, Image, validate_kubernetes
from jsonschema.protocols import Validator
from support import MODELS, make_settings
from test_autoscaling import closed

from app.config import Settings
from app.model.repository import discover

SCHEMAS = Path(__file__).parent / "schemas"
KSERVE = KUBERNETES / "kserve"
RUNTIME = KSERVE / "clusterservingruntime.yaml"
BY_FORMAT = KSERVE / "inferenceservice-runtime.yaml"
CUSTOM = KSERVE / "inferenceservice.yaml"
# Where KServe's storage initializer puts the model (pkg/constants DefaultModelLocalMountPath).
MOUNT = "/mnt/models"
# KServe's own pytorch runtime (config/runtimes/kserve-torchserve.yaml, v0.20.0): pytorch "1",
# autoSelect, priority 2, protocols v1, v2 and grpc-v2.
TORCHSERVE_PYTORCH_PRIORITY = 2
# KServe fills Go-template placeholders from the InferenceService's metadata.
PLACEHOLDER = re.compile(r"\{\{\s*\.Name\s*\}\}")


def load(path: Path) -> list[dict[str, Any]]:
    # The InferenceService CRD is 2 MB of YAML: libyaml reads it three times faster.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(path.read_text(), Loader=loader) if doc]


def crd_validator(name: str, version: str) -> Validator:
    """A validator for a served version of a committed CRD, its schema closed as the API
    server's strict field validation is (checked once: the InferenceService's is large)."""
    [crd] = load(SCHEMAS / name)
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert served["served"], f"{name} {version} is not served"
    schema = closed(served["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator: Validator = cls(schema)
    return validator


@pytest.fixture(scope="module")
def runtime_schema() -> Validator:
    return crd_validator("serving.kserve.io_clusterservingruntimes.yaml", "v1alpha1")


@pytest.fixture(scope="module")
def isvc_schema() -> Validator:
    return crd_validator("serving.kserve.io_inferenceservices.yaml", "v1beta1")


@pytest.fixture(scope="module")
def runtime() -> dict[str, Any]:
    [resource] = load(RUNTIME)
    return resource


@pytest.fixture(scope="module")
def by_format() -> dict[str, Any]:
    [resource] = load(BY_FORMAT)
    return resource


def container_of(runtime: dict[str, Any]) -> dict[str, Any]:
    [container] = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container", "KServe merges the model into this name"
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), f"an env name twice: {names}"
    return {e["name"]: e["value"] for e in container["env"]}


def runtime_settings(runtime: dict[str, Any], model_name: str) -> Settings:
    """The Settings the runtime's environment gives evalserve, once KServe has replaced
    {{.Name}} with the InferenceService's name."""
    values = {
        name.removeprefix("EVALSERVE_").lower(): PLACEHOLDER.sub(model_name, value)
        for name, value in env_of(container_of(runtime)).items()
    }
    return Settings(**values)


def app_routes() -> set[str]:
    from app.main import create_app

    paths: dict[str, Any] = create_app(make_settings()).openapi()["paths"]
    return set(paths)


# ---------------------------------------------------------------------------------------------
# Against KServe's CRD schemas


def test_the_runtime_validates_against_kserves_crd_schema(
    runtime: dict[str, Any], runtime_schema: Validator
) -> None:
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert runtime["kind"] == "ClusterServingRuntime"
    runtime_schema.validate(runtime)


@pytest.mark.parametrize("path", [BY_FORMAT, CUSTOM], ids=lambda p: p.name)
def test_the_inference_services_validate_against_kserves_crd_schema(
    path: Path, isvc_schema: Validator
) -> None:
    [service] = load(path)
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    isvc_schema.validate(service)


def broken(resource: dict[str, Any], change: Any) -> dict[str, Any]:
    copied = copy.deepcopy(resource)
    change(copied)
    return copied


def port_as_string(runtime: dict[str, Any]) -> None:
    container_of(runtime)["ports"][0]["containerPort"] = "8000"


def misspelt_auto_select(runtime: dict[str, Any]) -> None:
    runtime["spec"]["supportedModelFormats"][0]["autoselect"] = True


def priority_zero(runtime: dict[str, Any]) -> None:
    runtime["spec"]["supportedModelFormats"][0]["priority"] = 0


def pod_field_on_runtime(runtime: dict[str, Any]) -> None:
    # A ServingRuntime has no terminationGracePeriodSeconds: it belongs on the InferenceService.
    runtime["spec"]["terminationGracePeriodSeconds"] = 90


@pytest.mark.parametrize(
    ("change", "error"),
    [
        pytest.param(port_as_string, "'8000' is not of type 'integer'", id="port_as_string"),
        pytest.param(
            misspelt_auto_select, "'autoselect' was unexpected", id="misspelt_auto_select"
        ),
        pytest.param(priority_zero, "0 is less than the minimum of 1", id="priority_zero"),
        pytest.param(
            pod_field_on_runtime,
            "'terminationGracePeriodSeconds' was unexpected",
            id="pod_field_on_runtime",
        ),
    ],
)
def test_the_crd_schema_rejects_a_broken_runtime(
    runtime: dict[str, Any], runtime_schema: Validator, change: Any, error: str
) -> None:
    with pytest.raises(jsonschema.ValidationError, match=re.escape(error)):
        runtime_schema.validate(broken(runtime, change))


def misspelt_storage_uri(service: dict[str, Any]) -> None:
    model = service["spec"]["predictor"]["model"]
    model["storageURI"] = model.pop("storageUri")


def model_format_as_string(service: dict[str, Any]) -> None:
    service["spec"]["predictor"]["model"]["modelFormat"] = "pytorch"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        pytest.param(
            misspelt_storage_uri, "'storageURI' was unexpected", id="misspelt_storage_uri"
        ),
        pytest.param(
            model_format_as_string, "'pytorch' is not of type 'object'", id="model_format_as_string"
        ),
    ],
)
def test_the_crd_schema_rejects_a_broken_inference_service(
    by_format: dict[str, Any], isvc_schema: Validator, change: Any, error: str
) -> None:
    with pytest.raises(jsonschema.ValidationError, match=re.escape(error)):
        isvc_schema.validate(broken(by_format, change))


def test_the_pod_kserve_would_build_is_a_valid_kubernetes_pod(
    runtime: dict[str, Any], by_format: dict[str, Any]
) -> None:
    # KServe merges the runtime's container and volumes with the predictor's pod fields (and
    # adds the storage initializer); kubernetes-validate checks what evalserve contributes.
    predictor = by_format["spec"]["predictor"]
    pod_fields = {"terminationGracePeriodSeconds", "securityContext"}
    spec = {
        "containers": runtime["spec"]["containers"],
        "volumes": runtime["spec"]["volumes"],
        **{k: v for k, v in predictor.items() if k in pod_fields},
    }
    validate_kubernetes(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": spec}
    )


# ---------------------------------------------------------------------------------------------
# Consistent with the app and the base Deployment


def test_the_runtime_environment_names_real_settings_with_valid_values(
    runtime: dict[str, Any], by_format: dict[str, Any]
) -> None:
    env = env_of(container_of(runtime))
    fields = {f"EVALSERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, sorted(set(env) - fields)
    name = by_format["metadata"]["name"]
    settings = runtime_settings(runtime, name)  # raises on a value Settings refuses
    assert settings.default_model == name
    assert env["EVALSERVE_DEFAULT_MODEL"] == "{{.Name}}"


def test_the_runtime_listens_on_its_declared_ports(runtime: dict[str, Any]) -> None:
    container = container_of(runtime)
    settings = runtime_settings(runtime, "model")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http1": settings.port, "h2c": settings.grpc_port}
    assert settings.host == "0.0.0.0"
    # KServe's Service sends port 80 to the first port; the second keeps its number, with
    # appProtocol kubernetes.io/h2c because its name contains h2c.
    assert container["ports"][0]["name"] == "http1"
    assert all(p["protocol"] == "TCP" for p in container["ports"])
    annotations = runtime["spec"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == settings.port
    assert int(annotations["prometheus.kserve.io/port"]) == settings.port
    routes = app_routes()
    assert annotations["prometheus.io/path"] in routes
    assert annotations["prometheus.kserve.io/path"] in routes


def test_the_runtime_serves_the_model_kserve_downloads_to_mnt_models(
    runtime: dict[str, Any],
) -> None:
    container = container_of(runtime)
    assert str(runtime_settings(runtime, "model").model_repository) == MOUNT
    # KServe mounts the model volume there itself; the runtime must not claim the path.
    assert all(not m["mountPath"].startswith(MOUNT) for m in container["volumeMounts"])


def test_the_runtime_runs_the_base_deployment_image_with_its_probes_and_limits(
    runtime: dict[str, Any], base_manifests: dict[str, dict[str, Any]], image: Image
) -> None:
    container = container_of(runtime)
    pod = base_manifests["Deployment"]["spec"]["template"]["spec"]
    [deployed] = pod["containers"]
    assert container["image"] == deployed["image"]
    assert container["command"] == image.start_command
    assert "args" not in container, "an InferenceService's args are appended to these"
    for key in ("resources", "lifecycle"):
        assert container[key] == deployed[key], key
    [custom] = load(CUSTOM)
    [custom_container] = custom["spec"]["predictor"]["containers"]
    for key in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[key] == custom_container[key], key
        # Knative refuses a probe port other than the container port, and a named one.
        assert container[key]["httpGet"]["port"] == container["ports"][0]["containerPort"]
    assert container["startupProbe"]["httpGet"]["path"] in app_routes()
    # The same settings as the Deployment, but where the model comes from and its name.
    env = env_of(container)
    for name, value in env_of(deployed).items():
        if name != "EVALSERVE_MODEL_REPOSITORY":
            assert env[name] == value, name
    # The base pod's user and the container's restrictions, all on the container here.
    security = container["securityContext"]
    for key in ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile"):
        assert security[key] == pod["securityContext"][key], key
    assert security.items() >= deployed["securityContext"].items()
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert {"name": mounts["/tmp"], "emptyDir": {"sizeLimit": "256Mi"}} in runtime["spec"][
        "volumes"
    ]


def test_the_inference_service_gives_the_drain_its_grace_period_and_the_pod_its_user(
    runtime: dict[str, Any], by_format: dict[str, Any], base_manifests: dict[str, dict[str, Any]]
) -> None:
    predictor = by_format["spec"]["predictor"]
    settings = runtime_settings(runtime, by_format["metadata"]["name"])
    command = container_of(runtime)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    drain = max(settings.drain_delay_s, settings.drain_timeout_s)
    stop = pause + drain + math.ceil(settings.request_timeout_s)
    assert predictor["terminationGracePeriodSeconds"] > stop
    pod = base_manifests["Deployment"]["spec"]["template"]["spec"]
    assert predictor["securityContext"] == pod["securityContext"]
    assert predictor["terminationGracePeriodSeconds"] == pod["terminationGracePeriodSeconds"]


def supports(runtime: dict[str, Any], model: dict[str, Any]) -> bool:
    """KServe's rule (pkg/apis/serving/v1beta1/predictor_model.go, RuntimeSupportsModel): the
    model's format, with its version if it gives one, is among the runtime's formats; where the
    InferenceService names no runtime, only formats with autoSelect count."""
    wanted = model["modelFormat"]
    for offered in runtime["spec"]["supportedModelFormats"]:
        if "runtime" not in model and not offered.get("autoSelect", False):
            continue
        if offered["name"] == wanted["name"] and (
            "version" not in wanted or offered.get("version") == wanted["version"]
        ):
            return True
    return False


def test_the_inference_service_asks_for_a_model_format_and_protocol_the_runtime_serves(
    runtime: dict[str, Any], by_format: dict[str, Any]
) -> None:
    predictor = by_format["spec"]["predictor"]
    model = predictor["model"]
    assert "containers" not in predictor, "the runtime provides the container"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert supports(runtime, model)
    # Also chosen by format alone (once no other runtime outranks it).
    assert supports(runtime, {k: v for k, v in model.items() if k != "runtime"})
    assert re.fullmatch(r"(gs|s3|pvc|https?|hf|oci)://\S+", model["storageUri"])


def test_the_format_check_can_fail(runtime: dict[str, Any], by_format: dict[str, Any]) -> None:
    model = by_format["spec"]["predictor"]["model"]
    assert not supports(runtime, broken(model, lambda m: m["modelFormat"].update(name="onnx")))
    assert not supports(runtime, broken(model, lambda m: m["modelFormat"].update(version="3")))
    # Version 1 only when the runtime is named.
    version_1 = broken(model, lambda m: m["modelFormat"].update(version="1"))
    assert supports(runtime, version_1)
    assert not supports(runtime, {k: v for k, v in version_1.items() if k != "runtime"})


def test_the_runtime_passes_kserves_priority_rules_without_outranking_torchserve(
    runtime: dict[str, Any],
) -> None:
    # KServe's ClusterServingRuntime webhook refuses different priorities for one format name
    # among a runtime's autoSelect formats, and an autoSelect format equal to another runtime's
    # with the same priority (pkg/webhook/admission/servingruntime).
    auto = [f for f in runtime["spec"]["supportedModelFormats"] if f.get("autoSelect")]
    assert auto
    for name in {f["name"] for f in auto}:
        assert len({f.get("priority") for f in auto if f["name"] == name}) == 1, name
    for offered in auto:
        if offered["name"] == "pytorch":
            # Below kserve-torchserve: InferenceServices that do not name a runtime keep it.
            assert offered["priority"] < TORCHSERVE_PYTORCH_PRIORITY
    # Only the Open Inference Protocol: evalserve's /v1 is not KServe's v1.
    assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}


def test_the_inference_service_name_is_a_model_name_evalserve_serves(
    by_format: dict[str, Any], tmp_path: Path
) -> None:
    # /mnt/models as the storage initializer leaves it, from the folder the example points at.
    mnt_models = tmp_path / "models"
    folder = by_format["spec"]["predictor"]["model"]["storageUri"].rstrip("/").split("/")[-1]
    shutil.copytree(MODELS / folder, mnt_models)
    name = by_format["metadata"]["name"]
    assert list(discover(mnt_models, name)) == [name]


def test_the_custom_predictor_and_the_runtime_use_the_same_deployment_mode(
    by_format: dict[str, Any],
) -> None:
    [custom] = load(CUSTOM)
    key = "serving.kserve.io/deploymentMode"
    assert by_format["metadata"]["annotations"][key] == custom["metadata"]["annotations"][key]
    # The autoscaling fields of the two predictors agree.
    for field in ("minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"):
        assert by_format["spec"]["predictor"][field] == custom["spec"]["predictor"][field], field
