"""Render a kustomization offline: `python deploy/render.py deploy/k8s/overlays/scale-out`.

Where kubectl is installed, use kustomize itself: `kubectl kustomize DIR` (or `kubectl apply -k
DIR`); this script then just runs it. This file is the fallback for machines without kubectl
(CI's), so the offline validation (deploy/validate.py, tests/deploy) runs everywhere:
- `kubectl kustomize` (kustomize built into kubectl, no network needed) when kubectl is on PATH
  and --builtin is not given;
- else a small built-in renderer for the subset of kustomize these manifests use:
  `resources` (files, and directories holding a kustomization.yaml),
  `namespace`, and `patches` of strategic-merge patch files (`path`, optional
  `target: {kind, name}`; without a target the patch's own kind and name pick the object).
  Strategic merge here: maps merge recursively, `null` deletes a key, lists of maps that all
  carry `name` merge by name (containers, env), every other list is replaced. Any other
  kustomization key is an error, never silently ignored. tests/deploy checks that both renderers
  agree whenever kubectl is there.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "APIService",
                  "PriorityClass", "StorageClass", "PersistentVolume", "RuntimeClass", "IngressClass",
                  "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}


def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def merge(base, patch):
    """Strategic merge (the subset described above) of `patch` into `base`; returns a new object."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out = [copy.deepcopy(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def key_of(obj: dict) -> tuple[str, str, str]:
    meta = obj.get("metadata", {})
    return obj["kind"], meta.get("namespace", ""), meta["name"]


def render_builtin(directory: str | Path) -> list[dict]:
    directory = Path(directory)
    kfile = directory / "kustomization.yaml"
    spec = load_docs(kfile)[0]
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise ValueError(f"{kfile}: kustomize keys {sorted(unknown)} are not supported by the built-in renderer")
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        objects.extend(render_builtin(path) if path.is_dir() else load_docs(path))
    if spec.get("namespace"):
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = spec["namespace"]
    for entry in spec.get("patches", []):
        if set(entry) - {"path", "target"}:
            raise ValueError(f"{kfile}: only `path` (+ `target`) strategic-merge patches are supported: {entry}")
        (patch,) = load_docs(directory / entry["path"])
        target = entry.get("target") or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
        if set(target) - {"kind", "name"}:
            raise ValueError(f"{kfile}: patch targets by kind and name only: {target}")
        hits = [i for i, o in enumerate(objects)
                if o["kind"] == target.get("kind", o["kind"]) and o["metadata"]["name"] == target.get("name")]
        if len(hits) != 1:
            raise ValueError(f"{kfile}: patch {entry['path']} matches {len(hits)} objects ({target})")
        body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind", "metadata")}
        meta_patch = {k: v for k, v in patch.get("metadata", {}).items() if k not in ("name", "namespace")}
        obj = objects[hits[0]]
        obj = merge(obj, body)
        if meta_patch:
            obj["metadata"] = merge(obj["metadata"], meta_patch)
        objects[hits[0]] = obj
    seen = set()
    for obj in objects:
        if key_of(obj) in seen:
            raise ValueError(f"{kfile}: {key_of(obj)} defined twice")
        seen.add(key_of(obj))
    return objects


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render_kubectl(directory: str | Path, timeout_s: float = 120) -> list[dict]:
    exe = kubectl()
    if exe is None:
        raise FileNotFoundError("kubectl is not installed: render with render_builtin (--builtin)")
    out = subprocess.run([exe, "kustomize", str(directory)], check=True, capture_output=True, text=True,
                         timeout=timeout_s).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def render(directory: str | Path, builtin: bool = False) -> list[dict]:
    return render_builtin(directory) if builtin or not kubectl() else render_kubectl(directory)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory")
    p.add_argument("--builtin", action="store_true", help="the built-in renderer even when kubectl is there")
    args = p.parse_args(argv)
    yaml.safe_dump_all(render(args.directory, args.builtin), sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
