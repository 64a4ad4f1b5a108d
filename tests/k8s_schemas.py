"""Schemas a PyTorchJob manifest must satisfy before a cluster would take it.

:data:`WORK_POOL_JOB_SCHEMA` is the batch/v1 Job Prefect's Kubernetes worker submits from the work-pool
template; :data:`PYTORCHJOB_SCHEMA` is the ``kubeflow.org/v1`` PyTorchJob resource as the Training Operator's CRD
defines its top levels (replica types, restart and clean-pod policies, ``nprocPerNode`` as a string) plus
what the operator requires of the pods (a container named ``pytorch``; with a Master, exactly one).
:func:`unknown_pod_fields` checks each pod template against the Kubernetes API's own models (the official
client's ``V1PodTemplateSpec``): any field they do not know is a typo the API server would drop or refuse.
"""

from __future__ import annotations

from typing import Any

_QUANTITY = {"type": ["string", "integer"]}
_NAME = {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}


def _resource(api_version: str, kind: str, metadata: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """A Kubernetes object of ``kind``: its ``metadata`` and ``spec`` schemas under the common envelope."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": {"type": "object", **metadata},
            "spec": {"type": "object", **spec},
        },
    }


_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "image": {"type": "string", "minLength": 1},
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
        "env": {
            "type": "array",
            "items": {"type": "object", "required": ["name"], "properties": {"value": {"type": "string"}}},
        },
        "envFrom": {"type": "array", "items": {"type": "object"}},
        "resources": {
            "type": "object",
            "properties": {
                "limits": {"type": "object", "additionalProperties": _QUANTITY},
                "requests": {"type": "object", "additionalProperties": _QUANTITY},
            },
        },
    },
}


def _pod_template(pod_spec: dict[str, Any]) -> dict[str, Any]:
    """A PodTemplateSpec whose ``spec`` follows ``pod_spec``."""
    return {"type": "object", "required": ["spec"], "properties": {"spec": {"type": "object", **pod_spec}}}


_REPLICA = {
    "type": "object",
    "required": ["replicas", "template"],
    "properties": {
        "replicas": {"type": "integer", "minimum": 0},
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "template": _pod_template(
            {
                "required": ["containers"],
                "properties": {
                    "containers": {
                        "type": "array",
                        "minItems": 1,
                        "items": _CONTAINER,
                        "contains": {"properties": {"name": {"const": "pytorch"}}},
                    }
                },
            }
        ),
    },
}

PYTORCHJOB_SCHEMA: dict[str, Any] = _resource(
    "kubeflow.org/v1",
    "PyTorchJob",
    {
        "required": ["name"],
        "properties": {"name": _NAME, "namespace": {"type": "string", "minLength": 1}, "labels": _LABELS},
    },
    {
        "required": ["pytorchReplicaSpecs"],
        "additionalProperties": False,
        "properties": {
            "nprocPerNode": {"type": "string", "pattern": "^([1-9][0-9]*|auto|cpu|gpu)$"},
            "elasticPolicy": {"type": "object"},
            "runPolicy": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 0},
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
                    "managedBy": {"type": "string"},
                    "schedulingPolicy": {"type": "object"},
                    "suspend": {"type": "boolean"},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                },
            },
            "pytorchReplicaSpecs": {
                "type": "object",
                "required": ["Master"],
                "additionalProperties": False,
                "properties": {
                    "Master": {"allOf": [_REPLICA, {"properties": {"replicas": {"const": 1}}}]},
                    "Worker": _REPLICA,
                },
            },
        },
    },
)

#: A batch/v1 Job as Prefect's Kubernetes worker submits it from infra/k8s/gpu-work-pool-template.json
#: (the fields the template sets; ``args`` is one string and ``env`` a mapping: the worker converts both).
WORK_POOL_JOB_SCHEMA: dict[str, Any] = _resource(
    "batch/v1",
    "Job",
    {
        "required": ["generateName", "namespace"],
        "properties": {
            "generateName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?-$"},
            "namespace": {"type": "string", "minLength": 1},
            "labels": _LABELS,
        },
    },
    {
        "required": ["template"],
        "properties": {
            "backoffLimit": {"type": "integer", "minimum": 0},
            "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
            "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
            "template": _pod_template(
                {
                    "required": ["containers", "restartPolicy"],
                    "properties": {
                        "restartPolicy": {"enum": ["Never", "OnFailure"]},
                        "nodeSelector": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                        "tolerations": {"type": "array", "items": {"type": "object"}},
                        "securityContext": {
                            "type": "object",
                            "properties": {"runAsNonRoot": {"const": True}},
                            "required": ["runAsNonRoot"],
                        },
                        "volumes": {
                            "type": "array",
                            "items": {"type": "object", "required": ["name"]},
                        },
                        "containers": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name", "image", "resources"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "image": {"type": "string", "minLength": 1},
                                    "args": {"type": "string"},  # the worker shlex-splits it
                                    "env": {"type": "object"},  # the worker turns it into a list
                                    "envFrom": {"type": "array", "items": {"type": "object"}},
                                    "resources": {
                                        "type": "object",
                                        "properties": {
                                            "limits": {
                                                "type": "object",
                                                "additionalProperties": _QUANTITY,
                                            },
                                            "requests": {
                                                "type": "object",
                                                "additionalProperties": _QUANTITY,
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    },
                }
            ),
        },
    },
)


def unknown_pod_fields(pod_template: dict[str, Any]) -> list[str]:
    """Paths of ``pod_template``'s keys that the Kubernetes API's ``V1PodTemplateSpec`` does not define."""
    from kubernetes import client

    unknown: list[str] = []

    def walk(value: Any, klass: str, path: str) -> None:
        if klass.lower().startswith("list[") and isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, klass[5:-1], f"{path}[{i}]")
            return
        model = getattr(client.models, klass, None)
        if model is None or not isinstance(value, dict):
            return  # a primitive, a map of primitives (labels, quantities) or an opaque object
        for key, item in value.items():
            attribute = next((a for a, k in model.attribute_map.items() if k == key), None)
            if attribute is None:
                unknown.append(f"{path}.{key}")
            else:
                walk(item, model.openapi_types[attribute], f"{path}.{key}")

    walk(pod_template, "V1PodTemplateSpec", "template")
    return unknown
