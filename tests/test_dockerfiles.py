"""The images' build-time library check (``dockerfiles/check_libraries.py``) against real binaries: the
``tritonserver`` of the nvidia-pytriton wheel (``.tools/triton``) and the venv's ONNX Runtime; and what the
Dockerfiles run it on. (hadolint lints the Dockerfiles in tests/helm/test_charts.py.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "dockerfiles" / "check_libraries.py"
TRITON = next(iter(sorted((ROOT / ".tools" / "triton" / "lib").glob("python3*/site-packages/pytriton/tritonserver"))),
              ROOT / ".tools" / "triton" / "no-pytriton")


def check(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), *map(str, args)], capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.fixture(scope="module")
def tritonserver() -> Path:
    if not (TRITON / "bin" / "tritonserver").exists():
        pytest.skip(f"no {TRITON}: nvidia-pytriton is not installed (make test installs it)")
    return TRITON / "bin" / "tritonserver"


def test_a_tree_whose_libraries_all_resolve_passes(tritonserver):
    done = check(tritonserver, TRITON / "backends" / "python", "--module", "onnxruntime")
    assert done.returncode == 0, done.stderr
    checked = int(done.stdout.split()[0])
    assert checked >= 3  # tritonserver, Triton's Python backend, ONNX Runtime's extension (not an empty pass)


def test_a_binary_that_misses_a_library_fails_the_build_in_one_line(tritonserver, tmp_path):
    """The binary copied away from the libraries its rpath ($ORIGIN/../../../nvidia_pytriton.libs) points at: ldd
    finds them "not found", and the check says which, in one line per file, and exits 1."""
    copied = tmp_path / "tritonserver"
    shutil.copy(tritonserver, copied)
    done = check(copied, "--module", "onnxruntime")
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"{copied} needs ") and "libtritonserver" in line and "not found" in line
    # libraries the container runtime mounts from the host are not looked for
    missing = re.findall(r"(lib[\w.+-]+\.so[\w.]*)", line.split(" which ")[0])
    forgiven = [arg for lib in missing for arg in ("--host-provided", lib.split(".so")[0] + ".so*")]
    assert check(copied, *forgiven).returncode == 0


def test_a_missing_module_or_path_is_one_line():
    done = check("--module", "tensorrt_not_here")
    assert done.returncode == 1 and done.stderr.strip() == (
        f"the tensorrt_not_here Python module is missing from this image ({sys.executable} cannot find it)")
    gone = check("/no/such/tritonserver")
    assert gone.returncode == 1 and gone.stderr.strip() == "/no/such/tritonserver is not in this image"


def run_lines(dockerfile: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = (ROOT / "dockerfiles" / dockerfile).read_text()
    return [line for line in re.sub(r"\\\n\s*", " ", text).splitlines() if line and not line.startswith("#")]


def test_the_jetson_image_installs_tritons_runtime_libraries_and_checks_them_at_build_time():
    lines = run_lines("edge-jetson.Dockerfile")
    runtime = lines.index(next(line for line in lines if line.startswith("FROM ") and "-runtime" in line))
    (install,) = [line for line in lines[runtime:] if "apt-get install" in line]
    for package in ("libb64-0d", "libre2-9", "libssl3", "libarchive13", "libopenblas0", "zlib1g", "libpython3.10"):
        assert f" {package} " in f" {install} ", package  # Triton's Jetson guide, Ubuntu 22.04 names
    (checked,) = [line for line in lines[runtime:] if "check_libraries.py" in line and line.startswith("RUN")]
    for wanted in ("--module tensorrt", "--module onnxruntime", "/opt/tritonserver/bin/tritonserver",
                   "/opt/tritonserver/backends/onnxruntime", "/opt/tritonserver/backends/python",
                   "LD_LIBRARY_PATH=/opt/tritonserver/lib"):
        assert wanted in checked, wanted
    assert lines.index(checked) > lines.index(install)  # checked after the libraries are installed


def test_the_x86_image_checks_its_triton_and_onnx_runtime_at_build_time():
    lines = run_lines("edge-x86.Dockerfile")
    (checked,) = [line for line in lines if line.startswith("RUN") and "check_libraries.py" in line]
    for wanted in ("--module onnxruntime", "pytriton/tritonserver/bin", "python_backend_stubs/3.11",
                   "triton/backend/build"):
        assert wanted in checked, wanted
