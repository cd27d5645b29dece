"""Fail an image build, not a device, when a binary the image ships cannot find a shared library it needs.

Runs ``ldd`` on every ELF file named (a folder: every ELF file under it; ``--module NAME``: the extension modules
of a Python package, found without importing it, as importing TensorRT needs a GPU the build host lacks) and
prints one line per file with a library ``ldd`` reports "not found", then exits 1; exits 0 when all resolve.
Libraries the NVIDIA container runtime mounts from the host at run time (``--host-provided GLOB``: libcuda, the
Tegra ``libnvrm*`` on Jetson) are not looked for. Standard library only: it runs in any image with a python3.

    python3 check_libraries.py [--host-provided GLOB]... [--module NAME]... PATH...
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import subprocess
import sys
from pathlib import Path

ELF_MAGIC = b"\x7fELF"


def elf_files(path: Path) -> list[Path]:
    """``path`` if it is an ELF file, else every ELF file under the folder ``path`` (sorted)."""
    candidates = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    found = []
    for candidate in candidates:
        try:
            with open(candidate, "rb") as f:
                if f.read(4) == ELF_MAGIC:
                    found.append(candidate)
        except OSError:
            continue
    return found


def module_files(name: str) -> list[Path]:
    """The ELF files of Python package ``name`` (found, not imported); SystemExit with one line if it is absent."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"the {name} Python module is missing from this image ({sys.executable} cannot find it)")
    folders = list(spec.submodule_search_locations or []) or [str(Path(spec.origin or "").parent)]
    return [f for folder in folders for f in elf_files(Path(folder))]


def missing_libraries(path: Path, host_provided: list[str]) -> list[str]:
    """The libraries ``ldd`` cannot find for ``path`` (none for a static file), less those the host provides."""
    try:
        done = subprocess.run(["ldd", str(path)], capture_output=True, text=True, timeout=120, check=False)
    except OSError as exc:
        raise SystemExit(f"cannot run ldd ({exc}): install libc-bin") from exc
    missing = [line.split("=>", 1)[0].strip() for line in done.stdout.splitlines() if "not found" in line]
    return [lib for lib in missing if not any(fnmatch.fnmatch(lib, glob) for glob in host_provided)]


def main(argv: list[str] | None = None) -> int:
    """Check the files ``argv`` names; 1 (and one line per broken file on stderr) if any misses a library."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="ELF files or folders of them")
    parser.add_argument("--module", action="append", default=[], help="a Python package whose extensions to check")
    parser.add_argument("--host-provided", action="append", default=[], help="a library the host mounts (glob)")
    args = parser.parse_args(argv)
    files: list[Path] = []
    for path in args.paths:
        if not path.exists():
            raise SystemExit(f"{path} is not in this image")
        files += elf_files(path)
    for name in args.module:
        files += module_files(name)
    if not files:
        raise SystemExit("no ELF file to check: the paths and modules named hold none")
    broken = 0
    for path in files:
        missing = missing_libraries(path, args.host_provided)
        if missing:
            broken += 1
            print(f"{path} needs {', '.join(missing)}, which this image does not have (ldd: not found): install the "
                  "package that provides it", file=sys.stderr)
    if not broken:
        print(f"{len(files)} files checked: every library they need is here")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
