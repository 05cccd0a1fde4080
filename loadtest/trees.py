"""Another git revision of this repository, importable beside this checkout: the before side of
the before/after harnesses (`loadtest.engine_ab`, `loadtest.mesh_ab`)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]


def short_rev(rev: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """`rev` checked out into a temporary git worktree, removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)


@contextlib.contextmanager
def tree_env(tree: Path) -> Iterator[dict[str, str]]:
    """An environment whose `import michi` (and `services`, `loadtest`) is `tree`'s own.

    A tree from before folder = package had the library in shared/ (installed as `michi`) and the
    stages in services/ (installed as `michi.services`): it is rebuilt as a `michi` folder of links.
    Checks that `import michi` there finds the tree's, not this checkout's installed one."""
    with tempfile.TemporaryDirectory() as links:
        if (tree / "shared" / "michi").is_dir():
            path = [str(tree / "shared"), str(tree)]
        else:
            package = Path(links) / "michi"
            package.mkdir()
            for entry in (tree / "shared").iterdir():
                (package / entry.name).symlink_to(entry)
            (package / "services").symlink_to(tree / "services")
            path = [links, str(tree)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        imported = subprocess.run([sys.executable, "-c", "import michi; print(michi.__file__)"], cwd=tree, env=env,
                                  check=True, capture_output=True, text=True).stdout.strip()
        if not imported.startswith(path[0]):
            raise RuntimeError(f"`import michi` in {tree} found {imported}, not the tree's")
        yield env


@contextlib.contextmanager
def sides(before: str) -> Iterator[list[tuple[str, Path, dict[str, str]]]]:
    """("before", the worktree of `before`, its environment) and ("after", this checkout, its
    environment), each built and checked once for a whole harness run."""
    with worktree(before) as before_tree, tree_env(before_tree) as before_env, tree_env(ROOT) as after_env:
        yield [("before", before_tree, before_env), ("after", ROOT, after_env)]
