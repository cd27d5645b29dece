"""edgeloop's own Triton backend (``backend/backend.c``; opt-in, ``EDGE_TRITON_BACKEND=edgeloop``): found prebuilt,
or built here with the C compiler.

The backend runs ONNX Runtime engines inside ``tritonserver`` through an embedded Python interpreter, where Triton's
Python backend runs each model in a stub process and moves every request and response through shared memory (on one
CPU core that costs about as much as a small model). It is compiled against one interpreter (its headers and shared
``libpython``), which then runs ``edgeloop_engine.py`` inside tritonserver: the interpreter's site-packages must
have numpy and onnxruntime.

* :func:`backend_library` returns the library for an interpreter: prebuilt into the package's
  ``backend/build`` (images do that at build time, ``edgeloop edge triton-backend``), else built once into a
  work folder, keyed by the source and the interpreter, so an upgrade rebuilds it. ConfigError, saying what is
  missing (a compiler, Python's headers, a shared libpython), where it cannot be had.
* :func:`install_backend` lays it out as a Triton backend (``<backends>/edgeloop/``) beside the other backends.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from edgeloop_core.errors import ConfigError

FOLDER = Path(__file__).with_name("backend")
SOURCE = FOLDER / "backend.c"
ENGINE_MODULE = FOLDER / "edgeloop_engine.py"
PREBUILT = FOLDER / "build"
LIBRARY = "libtriton_edgeloop.so"
NAME = "edgeloop"
"""The backend's name in config.pbtxt (``backend: "edgeloop"``) and its folder under Triton's backend directory."""

_PROBE = ("import importlib.util, json, sys, sysconfig; v = sysconfig.get_config_var; "
          "print(json.dumps({'include': sysconfig.get_paths()['include'], 'libdir': v('LIBDIR'), "
          "'soname': v('INSTSONAME'), 'ldversion': v('LDVERSION'), 'version': sys.version.split()[0], "
          "'missing': [m for m in ('numpy', 'onnxruntime') if importlib.util.find_spec(m) is None]}))")


def python_facts(python: Path) -> dict[str, str]:
    """What building against ``python`` needs: its headers, its shared libpython (folder and name), its version;
    ConfigError where it lacks one, or numpy and onnxruntime (the backend runs engines with them)."""
    try:
        facts = json.loads(subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=60,
                                          check=True).stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise ConfigError(f"cannot ask {python} how it was built: {exc}") from exc
    if facts.pop("missing"):
        raise ConfigError(f"{python} cannot import numpy and onnxruntime, which the backend runs engines with")
    if not (Path(facts["include"]) / "Python.h").exists():
        raise ConfigError(f"{python} has no C headers at {facts['include']} (install python3-dev)")
    if not facts["libdir"] or not facts["soname"] or not (Path(facts["libdir"]) / facts["soname"]).exists():
        raise ConfigError(f"{python} has no shared libpython ({facts['soname']} in {facts['libdir']}): the backend "
                          "embeds it (install libpython3.x, or use a Python built with --enable-shared)")
    return facts


def _key(facts: dict[str, str]) -> str:
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(json.dumps(facts, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def build(facts: dict[str, str], into: Path) -> Path:
    """Compile the backend against the interpreter ``facts`` describe into ``into`` (whole or not at all);
    returns the library. ConfigError with the compiler's first error line."""
    compiler = shlex.split(os.environ.get("CC", "cc")) or ["cc"]  # a command, as make takes it
    if shutil.which(compiler[0]) is None:
        raise ConfigError(f"no C compiler ({compiler[0]}; CC names another) to build edgeloop's Triton backend with")
    staging = into.with_name(into.name + f".{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    argv = [*compiler, "-O2", "-shared", "-fPIC", f'-DEDGELOOP_LIBPYTHON="{facts["soname"]}"',
            f"-I{facts['include']}", "-o", str(staging / LIBRARY), str(SOURCE), f"-L{facts['libdir']}",
            f"-lpython{facts['ldversion']}", f"-Wl,-rpath,{facts['libdir']}"]
    try:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ConfigError(f"the C compiler did not run: {exc}") from exc
        if done.returncode != 0:
            said = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or [""]
            raise ConfigError(f"edgeloop's Triton backend did not compile: {said[0].strip()}")
        shutil.rmtree(into, ignore_errors=True)
        into.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(into)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return into / LIBRARY


def backend_library(python: Path, work: Path) -> Path:
    """The backend library for ``python``: prebuilt in the package, else built (once) under ``work``."""
    facts = python_facts(python)
    key = _key(facts)
    for folder in (PREBUILT / key, Path(work) / "edgeloop-backend" / key):
        if (folder / LIBRARY).exists():
            return folder / LIBRARY
    return build(facts, Path(work) / "edgeloop-backend" / key)


def install_backend(library: Path, backends: Path) -> None:
    """Lay the backend out under Triton's backend directory ``backends`` (replacing what an older edgeloop left)."""
    target = backends / NAME
    staging = backends / f".{NAME}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copy(library, staging / LIBRARY)
    shutil.copy(ENGINE_MODULE, staging / ENGINE_MODULE.name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def prebuild(python: Path) -> Path:
    """Build the backend into the package for ``python`` (``edgeloop edge triton-backend``, run by the images at
    build time, where the compiler is); the runtime then finds it without one."""
    facts = python_facts(python)
    return build(facts, PREBUILT / _key(facts))
