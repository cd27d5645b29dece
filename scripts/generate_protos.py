"""Generate the Python modules and .pyi stubs for ``protos/*.proto`` into ``edge_runtime/protos/``.

Usage: ``python scripts/generate_protos.py [--out DIR]``. The generated files are committed; the test suite
regenerates them into a temporary folder and fails on any difference, so they never drift from the sources.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
PACKAGE = "edgeloop_core.protos"


def generate(out: Path) -> list[Path]:
    """Run protoc (grpcio-tools) and rewrite the generated sibling imports to package-absolute ones."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(PROTOS.glob("*.proto"))
    for source in sources:
        args = ["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
                str(source)]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {source.name}")
    generated = sorted(p for p in out.iterdir() if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")))
    for path in generated:
        text = path.read_text()
        text = re.sub(r"^import (\w+_pb2) as (\w+)$", rf"from {PACKAGE} import \1 as \2", text, flags=re.M)
        # Our own descriptor pool: tritonclient registers the same `inference.*` names in the default pool, and a
        # process that imports both (a client app, our tests) would otherwise fail with "duplicate symbol".
        text = text.replace("_descriptor_pool.Default().AddSerializedFile(",
                            f"__import__('{PACKAGE}._pool', fromlist=['POOL']).POOL.AddSerializedFile(")
        path.write_text(text)
    return generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "edgeloop_core" / "protos")
    files = generate(parser.parse_args().out)
    sys.stdout.write("".join(f"wrote {p}\n" for p in files))


if __name__ == "__main__":
    main()
