"""deploy/kuberay/: every manifest validates against its KubeRay CRD (../shared/k8s/kuberay/),
unknown fields being errors, as `kubectl apply --validate=strict` would find them."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO.parent / "shared" / "k8s" / "kuberay"
MANIFESTS = {
    "rayjob-finetune.yaml": "ray.io_rayjobs.yaml",
    "rayjob-embed.yaml": "ray.io_rayjobs.yaml",
    "raycronjob-nightly.yaml": "ray.io_raycronjobs.yaml",
}


def _gib(quantity: str) -> float:
    assert quantity.endswith("Gi"), quantity
    return float(quantity[:-2])


def _strict(schema):
    """The CRD's OpenAPI schema with unknown fields refused wherever Kubernetes would prune
    them (objects with declared properties and no x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


def _validator(crd_file: str) -> jsonschema.Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / crd_file).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    # Kubernetes checks apiVersion/kind/metadata itself; the CRD declares them loosely.
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Validator]:
    if not CRDS.is_dir():
        pytest.fail(f"KubeRay CRDs not found at {CRDS} (expected ../shared/k8s/kuberay)")
    return {crd: _validator(crd) for crd in set(MANIFESTS.values())}


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_manifest_matches_its_crd_strictly(validators, manifest):
    doc = yaml.safe_load((REPO / "deploy" / "kuberay" / manifest).read_text())
    errors = sorted(validators[MANIFESTS[manifest]].iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    spec = doc["spec"].get("jobTemplate", doc["spec"])
    cluster = spec["rayClusterSpec"]
    # What cluster.yaml promises: the head takes no work, autoscaling from zero, a GPU group.
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert {g["minReplicas"] for g in groups.values()} == {0}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    # Credentials only from a Secret, never inline; outputs in object storage.
    pods = [cluster["headGroupSpec"], *groups.values()]
    for pod in pods:
        (container,) = pod["template"]["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "sbertray-s3"}}]
        assert "env" not in container
        # A memory-backed /dev/shm that holds Ray's default object store (30% of memory).
        (mount,) = container["volumeMounts"]
        assert mount["mountPath"] == "/dev/shm"
        (volume,) = [v for v in pod["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory"
        memory = _gib(container["resources"]["limits"]["memory"])
        assert _gib(volume["emptyDir"]["sizeLimit"]) >= 0.3 * memory
    assert "s3://" in spec["entrypoint"] and "runs/" not in spec["entrypoint"]


def test_strict_validation_catches_an_unknown_field(validators):
    doc = yaml.safe_load((REPO / "deploy" / "kuberay" / "rayjob-embed.yaml").read_text())
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}  # a typo
    assert list(validators["ray.io_rayjobs.yaml"].iter_errors(doc))
