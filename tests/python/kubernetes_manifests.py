"""Loads Kubernetes manifests (YAML files given as arguments) with PyYAML and checks every
document against the official Kubernetes Python client's typed models: the document is
deserialised into its model (V1Deployment, V1Job, ...) and serialised back; the client ignores
keys it does not know and converts values to the model's types, so any difference between the
round trip and the input is an unknown field, a typo or a wrong type. Prints JSON
{"documents": [{"file", "kind", "name", "document"}], "problems": [...]}."""

import json
import sys

import yaml
from kubernetes import client

# apiVersion/kind -> model name of the client.
MODELS = {
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Service"): "V1Service",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("v1", "Secret"): "V1Secret",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("batch/v1", "Job"): "V1Job",
}


def differences(expected, actual, path="$"):
    """Where the round trip `actual` differs from the input `expected`."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = []
        for key in expected:
            if key not in actual:
                found.append(f"{path}.{key}: not a field of the model (unknown or misspelt)")
            else:
                found += differences(expected[key], actual[key], f"{path}.{key}")
        for key in actual:
            if key not in expected:
                found.append(f"{path}.{key}: added by the model")
        return found
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path}: {len(expected)} items became {len(actual)}"]
        found = []
        for i, (e, a) in enumerate(zip(expected, actual)):
            found += differences(e, a, f"{path}[{i}]")
        return found
    if type(expected) is not type(actual) or expected != actual:
        return [f"{path}: {expected!r} ({type(expected).__name__}) became {actual!r} ({type(actual).__name__})"]
    return []


def main():
    api = client.ApiClient()
    documents, problems = [], []
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as f:
            loaded = list(yaml.safe_load_all(f))
        for index, doc in enumerate(loaded):
            where = f"{path} document {index + 1}"
            if doc is None:
                problems.append(f"{where}: empty document")
                continue
            key = (doc.get("apiVersion"), doc.get("kind"))
            model = MODELS.get(key)
            if model is None:
                problems.append(f"{where}: no model for apiVersion/kind {key}")
                continue
            try:
                obj = api._ApiClient__deserialize(doc, model)
            except Exception as e:  # the client raises ValueError and TypeError for bad values
                problems.append(f"{where}: {model}: {e}")
                continue
            round_trip = api.sanitize_for_serialization(obj)
            problems += [f"{where} ({model}): {d}" for d in differences(doc, round_trip)]
            documents.append(
                {"file": path, "kind": doc["kind"], "name": doc["metadata"]["name"], "document": doc}
            )
    json.dump({"documents": documents, "problems": problems}, sys.stdout)


if __name__ == "__main__":
    main()
