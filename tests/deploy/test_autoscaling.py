"""Autoscaling on the work: the KEDA overlay (a ScaledObject, validated against KEDA's own CRD
schema) and the custom-metrics overlay (an HPA on Pods metrics, with the Prometheus Adapter
rules that produce them). Every query and rule names a series a real evalserve exports."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from deploy_support import KUBERNETES, load_yaml, rendered, validate_kubernetes
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from support import make_settings

from app.main import create_app

KEDA_CRD = Path(__file__).parent / "schemas" / "keda.sh_scaledobjects.yaml"
CUSTOM_METRICS = KUBERNETES / "overlays" / "custom-metrics"
SERIES = re.compile(r"\bevalserve_[a-z_]+\b")


def closed(schema: Any) -> Any:
    """A CRD's structural schema made strict, as the API server's strict field validation is:
    an object that lists its properties accepts no other field, unless it says it keeps them."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: closed(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


@pytest.fixture(scope="module")
def scaled_object_schema() -> dict[str, Any]:
    [crd] = load_yaml(KEDA_CRD)
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema: dict[str, Any] = closed(version["schema"]["openAPIV3Schema"])
    return schema


@pytest.fixture(scope="module")
def keda_manifests() -> dict[str, dict[str, Any]]:
    return rendered(KUBERNETES / "overlays" / "keda")


@pytest.fixture(scope="module")
def custom_metrics_manifests() -> dict[str, dict[str, Any]]:
    return rendered(CUSTOM_METRICS)


@pytest.fixture(scope="module")
def exported_series() -> set[str]:
    """Every sample name a served evalserve exposes on /metrics, after one prediction."""
    with TestClient(create_app(make_settings())) as client:
        photo = (Path(__file__).parents[2] / "app" / "photos" / "chelsea.jpg").read_bytes()
        assert client.post("/v1/predict", files={"file": photo}).status_code == 200
        text = client.get("/metrics").text
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_the_keda_scaled_object_validates_against_kedas_crd_schema(
    keda_manifests: dict[str, dict[str, Any]], scaled_object_schema: dict[str, Any]
) -> None:
    scaled = keda_manifests["ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    jsonschema.validate(scaled, scaled_object_schema)
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        validate_kubernetes(keda_manifests[kind])


def test_the_crd_schema_rejects_a_misspelt_field(
    keda_manifests: dict[str, dict[str, Any]], scaled_object_schema: dict[str, Any]
) -> None:
    broken = copy.deepcopy(keda_manifests["ScaledObject"])
    broken["spec"]["maxReplicas"] = broken["spec"].pop("maxReplicaCount")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, scaled_object_schema)


def test_keda_takes_over_the_base_autoscaler_with_its_bounds_and_behaviour(
    keda_manifests: dict[str, dict[str, Any]],
) -> None:
    scaled = keda_manifests["ScaledObject"]
    hpa = keda_manifests["HorizontalPodAutoscaler"]
    deployment = keda_manifests["Deployment"]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    # One autoscaler per Deployment: KEDA adopts the base's HPA instead of adding another.
    assert (
        scaled["metadata"]["annotations"]["scaledobject.keda.sh/transfer-hpa-ownership"] == "true"
    )
    adopted = spec["advanced"]["horizontalPodAutoscalerConfig"]
    assert adopted["name"] == hpa["metadata"]["name"]
    assert adopted["behavior"] == hpa["spec"]["behavior"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (
        hpa["spec"]["minReplicas"],
        hpa["spec"]["maxReplicas"],
    )


def test_keda_triggers_are_prometheus_queries_of_series_evalserve_exports(
    keda_manifests: dict[str, dict[str, Any]], exported_series: set[str]
) -> None:
    triggers = keda_manifests["ScaledObject"]["spec"]["triggers"]
    assert {t["name"] for t in triggers} == {"images-in-flight", "model-busy"}
    for trigger in triggers:
        assert trigger["type"] == "prometheus"
        assert trigger["metricType"] == "AverageValue"  # per replica
        metadata = trigger["metadata"]
        # The prometheus scaler's required fields (kedacore/keda pkg/scalers/prometheus_scaler.go).
        assert {"serverAddress", "query", "threshold"} <= set(metadata)
        assert all(isinstance(value, str) for value in metadata.values())
        assert float(metadata["threshold"]) > 0
        named = set(SERIES.findall(metadata["query"]))
        assert named, metadata["query"]
        assert named <= exported_series, named - exported_series


def test_the_custom_metrics_autoscaler_reads_what_the_adapter_rules_produce(
    custom_metrics_manifests: dict[str, dict[str, Any]],
    keda_manifests: dict[str, dict[str, Any]],
    exported_series: set[str],
) -> None:
    hpa = custom_metrics_manifests["HorizontalPodAutoscaler"]
    validate_kubernetes(hpa)
    base_hpa = rendered(KUBERNETES / "base")["HorizontalPodAutoscaler"]
    for key in ("scaleTargetRef", "minReplicas", "maxReplicas", "behavior"):
        assert hpa["spec"][key] == base_hpa["spec"][key], key
    wanted = {
        m["pods"]["metric"]["name"]: m["pods"]["target"]
        for m in hpa["spec"]["metrics"]
        if m["type"] == "Pods"
    }
    assert len(wanted) == len(hpa["spec"]["metrics"]) == 2  # no CPU target left over
    values = yaml.safe_load((CUSTOM_METRICS / "prometheus-adapter-values.yaml").read_text())
    rules = values["rules"]["custom"]
    produced = {rule["name"]["as"]: rule for rule in rules}
    assert set(wanted) <= set(produced), set(wanted) - set(produced)
    for rule in rules:
        [series] = SERIES.findall(rule["seriesQuery"])
        assert series in exported_series
        assert re.fullmatch(rule["name"]["matches"], series)
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.Series>>" in rule["metricsQuery"]
        assert "<<.LabelMatchers>>" in rule["metricsQuery"]
    # The same targets as the KEDA triggers, in the HPA's quantity syntax.
    thresholds = {
        t["name"]: float(t["metadata"]["threshold"])
        for t in keda_manifests["ScaledObject"]["spec"]["triggers"]
    }
    assert (
        float(wanted["evalserve_images_in_flight"]["averageValue"])
        == thresholds["images-in-flight"]
    )
    busy = wanted["evalserve_model_busy_ratio"]["averageValue"]
    assert busy.endswith("m")
    assert float(busy[:-1]) / 1000 == thresholds["model-busy"]
