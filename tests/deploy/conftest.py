"""The rendered kustomizations, once per session."""
import pytest
from deploy_support import OVERLAYS, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Every kustomization, by the built-in renderer (the one that needs nothing but PyYAML)."""
    return {name: render.render_builtin(path) for name, path in OVERLAYS.items()}
