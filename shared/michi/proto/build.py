"""Generate the Python gRPC code in this folder from `protos/` (one command, reproducible):

    python -m michi.proto.build            # regenerate
    python -m michi.proto.build --check    # exit 1 if the committed code is stale

Each API is a versioned package (`protos/<api>/v1/<api>.proto`, proto package `michi.<api>.v1`),
generated to `michi.proto.<api>.v1`. grpc_tools writes absolute imports (`from gateway.v1 import
...`); they are rewritten to relative ones so the code lives inside the `michi` package.
"""
from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = HERE.parents[2] / "protos"  # shared/michi/proto -> the repo root


def generate(out: Path, protos: Path = PROTOS) -> list[Path]:
    from grpc_tools import protoc

    files = sorted(protos.rglob("*.proto"))
    if not files:
        raise FileNotFoundError(f"no .proto files under {protos}")
    args = ["protoc", f"-I{protos}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
            *[str(f.relative_to(protos)) for f in files]]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    written = []
    for py in sorted(out.rglob("*_pb2*.py*")):
        text = py.read_text()
        text = re.sub(r"^from [\w.]+ import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
        py.write_text(text)
        written.append(py)
    for folder in {p.parent for p in written} | {p.parent.parent for p in written}:
        (folder / "__init__.py").touch()
    return written


def _tree(root: Path) -> list[Path]:
    """Generated files: everything below the API folders (build.py and this package's own
    __init__.py sit at the root and are not generated)."""
    return sorted(p.relative_to(root) for p in root.rglob("*.py*") if p.parent != root and "__pycache__" not in p.parts)


def stale(out: Path = HERE) -> list[str]:
    """Files whose committed generated code differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = set(_tree(fresh)), set(_tree(out))
        diffs = [f"missing {p}" for p in sorted(want - have)] + [f"extra {p}" for p in sorted(have - want)]
        diffs += [f"differs {p}" for p in sorted(want & have) if not filecmp.cmp(fresh / p, out / p, shallow=False)]
        return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the generated code is stale")
    args = parser.parse_args(argv)
    if args.check:
        diffs = stale()
        for d in diffs:
            print(d)
        print("generated code is stale: run `python -m michi.proto.build`" if diffs else "generated code is up to date")
        return 1 if diffs else 0
    for sub in [p for p in HERE.iterdir() if p.is_dir() and p.name != "__pycache__"]:
        shutil.rmtree(sub)
    for path in generate(HERE):
        print(path.relative_to(HERE.parents[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
