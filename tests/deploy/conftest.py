"""The rendered kustomizations, once per session."""
import pytest
from deploy_support import OVERLAYS, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Every kustomization, rendered by `kubectl kustomize` (kustomize itself, built into kubectl)
    where kubectl is installed, else by deploy/render.py's built-in subset renderer, so the offline
    checks also run on a machine without kubectl (CI's). Where kubectl is there,
    test_builtin_renderer_matches_kubectl_kustomize holds the fallback equal to kustomize."""
    return {name: render.render(path) for name, path in OVERLAYS.items()}


@pytest.fixture(scope="session")
def rendered_builtin() -> dict[str, list[dict]]:
    """Every kustomization by the built-in renderer (the one that needs nothing but PyYAML)."""
    return {name: render.render_builtin(path) for name, path in OVERLAYS.items()}
