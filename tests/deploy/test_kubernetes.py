"""The Kubernetes manifests, rendered as kustomize renders them and validated by
kubernetes-validate against the API schemas: the base, the GPU overlay, the startup probe's
patience, and selectors that pick the Deployment's pods."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
from deploy_support import KUBERNETES_VERSIONS, validate_kubernetes


def test_base_manifests_validate_against_the_kubernetes_schemas(
    base_manifests: dict[str, dict[str, Any]],
) -> None:
    assert set(base_manifests) == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    assert base_manifests["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    assert base_manifests["PodDisruptionBudget"]["apiVersion"] == "policy/v1"
    for resource in base_manifests.values():
        validate_kubernetes(resource)


def test_kubernetes_validation_rejects_a_misspelt_field(
    base_manifests: dict[str, dict[str, Any]],
) -> None:
    broken = copy.deepcopy(base_manifests["Deployment"])
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_gpu_overlay_renders_valid_manifests_with_one_gpu_per_pod_on_gpu_nodes(
    gpu_manifests: dict[str, dict[str, Any]], base_manifests: dict[str, dict[str, Any]]
) -> None:
    for resource in gpu_manifests.values():
        validate_kubernetes(resource)
    pod = gpu_manifests["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "EVALSERVE_DEVICE", "value": "cuda"} in container["env"]
    assert container["image"] == "evalserve:gpu"
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # The rest of the pod is the base's: probes, stop sequence, security.
    [base] = base_manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    for key in ("startupProbe", "readinessProbe", "livenessProbe", "lifecycle", "securityContext"):
        assert container[key] == base[key], key
    assert [e["name"] for e in container["env"]].count("EVALSERVE_DEVICE") == 1


def test_startup_probe_allows_minutes_of_model_loading(
    base_manifests: dict[str, dict[str, Any]],
) -> None:
    [container] = base_manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180


def test_service_autoscaler_and_disruption_budget_select_the_deployment_pods(
    base_manifests: dict[str, dict[str, Any]],
) -> None:
    deployment = base_manifests["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        base_manifests["Service"]["spec"]["selector"],
        base_manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector, selector
        assert selector.items() <= labels.items(), selector
    target = base_manifests["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "evalserve"}
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
