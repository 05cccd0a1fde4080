"""Offline schema validation of every Kubernetes manifest here and every rendered kustomization:
`python deploy/validate.py [--k8s-version 1.30] [--builtin]`.

Schemas come from the PyPI package kubernetes-validate (it ships the Kubernetes JSON schemas for
1.25 to 1.37 inside the wheel: nothing is fetched). Strict mode: unknown fields are errors.
Rendering: deploy/render.py (kubectl's built-in kustomize when kubectl is there, else the
built-in subset renderer). The docker-compose file is checked by tests/deploy."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import render  # noqa: E402  (after the sys.path entry above)

K8S_VERSION = "1.30"  # the oldest release we support (grpc probes: 1.24+, matchLabelKeys: 1.27+)
K8S_DIR = HERE / "k8s"


def kustomizations() -> list[Path]:
    return sorted(p.parent for p in K8S_DIR.rglob("kustomization.yaml"))


def resource_files() -> list[Path]:
    """Every file a kustomization lists under `resources` (whole objects; patches are partial)."""
    files = []
    for directory in kustomizations():
        spec = render.load_docs(directory / "kustomization.yaml")[0]
        files += [(directory / r).resolve() for r in spec.get("resources", []) if not (directory / r).is_dir()]
    return sorted(set(files))


def validate_object(obj: dict, version: str = K8S_VERSION) -> str | None:
    """None when the object is valid, else the error."""
    from kubernetes_validate import utils

    try:
        utils.validate(obj, version, strict=True)
    except utils.ValidationError as e:
        return f"{obj['kind']}/{obj['metadata'].get('name')}: {'.'.join(map(str, e.path))}: {e.message}"
    except utils.SchemaNotFoundError as e:
        return f"{obj['kind']}/{obj['metadata'].get('name')}: no schema ({e.message})"
    return None


def validate_all(version: str = K8S_VERSION, builtin: bool = False) -> list[str]:
    errors = []
    for path in resource_files():
        for obj in render.load_docs(path):
            if (err := validate_object(obj, version)):
                errors.append(f"{path.relative_to(HERE)}: {err}")
    for directory in kustomizations():
        for obj in render.render(directory, builtin):
            if (err := validate_object(obj, version)):
                errors.append(f"{directory.relative_to(HERE)} (rendered): {err}")
    return errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k8s-version", default=K8S_VERSION)
    p.add_argument("--builtin", action="store_true", help="render with the built-in renderer even if kubectl is there")
    args = p.parse_args()
    errors = validate_all(args.k8s_version, args.builtin)
    for e in errors:
        print("ERROR", e)
    n = len(kustomizations())
    print(f"{len(resource_files())} manifest files and {n} rendered kustomizations checked against Kubernetes "
          f"{args.k8s_version} schemas (strict): {len(errors)} errors")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
