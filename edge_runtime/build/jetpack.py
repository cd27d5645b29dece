"""The JetPack support matrix: which TensorRT each Jetson Linux (L4T) release ships, and what this runtime does with it.

One table, :data:`SUPPORT_MATRIX`, decides (:func:`check_jetson_support`) and documents
(``scripts/generate_support_matrix.py`` renders it into ``docs/fleet.md``; a test fails when the page drifts).

The rows follow NVIDIA's published pairings:

* JetPack 6.0 (L4T r36.3) ships TensorRT 8.6; JetPack 6.1/6.2 (L4T r36.4, and r36.5 for 6.2.x) ship TensorRT 10.3;
* JetPack 7.0 (L4T r38.2) and 7.1 (r38.4) ship TensorRT 10.x (10.13) with CUDA 13 for Jetson Thor;
  JetPack 7.2 (Jetson Linux r39) brings Orin to JetPack 7, still with a TensorRT 10.x;
* "Migrating TensorRT from 10.x to 11.x on Jetson/JetPack" (docs.nvidia.com/deeplearning/tensorrt/<v>/api/migration/
  tensorrt-10x-to-11x-jetson.html): TensorRT 11.0 to 11.4.0 do not support JetPack ("Jetson deployments must remain on
  a TensorRT 10.x release supported by their JetPack version"); 11.4.1 "supports NVIDIA JetPack 7.2.2 or later on
  Jetson AGX Orin and Jetson Thor"; Orin on JetPack 6 stays on TensorRT 10.x.

JetPack 7.2.2 is taken to be Jetson Linux r39.2 (JetPack 7.2.x is r39.x); a device reporting r39.0/r39.1 with
TensorRT 11.4.1+ is refused with that reason. Thor is compute capability 11.0 (``sm_110``) under CUDA 13 (CUDA 12.8/12.9
called it ``sm_101``); Orin Nano, Orin NX and AGX Orin are all 8.7.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeloop_core.errors import ConfigError

if TYPE_CHECKING:
    from edge_runtime.build.device import DeviceFacts

Version = tuple[int, ...]

ORIN_MODULES = ("orin-nano", "orin-nx", "agx-orin")
THOR_MODULES = ("agx-thor", "thor", "t5000", "t4000")


@dataclass(frozen=True)
class JetPackRow:
    """One row of the support matrix: an L4T range, the TensorRT builds found on it, and the verdict."""

    jetpack: str
    """``"6.1 / 6.2"``: the JetPack release(s) of the row."""
    l4t: str
    """How the docs name the L4T release(s): ``"r36.4"``."""
    l4t_from: Version
    """Lowest L4T release of the row, inclusive: ``(36, 4)``."""
    l4t_below: Version | None
    """First L4T release past the row (exclusive); ``None``: no upper bound."""
    trt: str
    """How the docs name the TensorRT builds: ``"10.3"``, ``"10.x"``, ``"11.4.1+"``."""
    trt_from: Version
    """Lowest TensorRT version of the row, inclusive: ``(10, 3)``."""
    trt_below: Version
    """First TensorRT version past the row (exclusive): ``(10, 4)``."""
    cuda: str
    python: str
    modules: tuple[str, ...]
    """Module slugs the row holds for (``agx-orin``); a device whose module is unknown is not refused for it."""
    gpu: str
    """Compute capability of the row's GPUs, as the docs show it: ``"sm_87"``."""
    supported: bool
    note: str
    """Supported: what the runtime does; refused: why, and what to do (the error message says this)."""
    module_bound: bool = False
    """NVIDIA supports the row's TensorRT on :attr:`modules` only (TensorRT 11 on JetPack): another module is refused.
    Otherwise :attr:`modules` only documents which modules run that JetPack."""

    def holds_for(self, l4t: Version, trt: Version) -> bool:
        """This row's L4T range holds ``l4t`` and its TensorRT range holds ``trt``."""
        return self.l4t_covers(l4t) and self.trt_from <= trt < self.trt_below

    def l4t_covers(self, l4t: Version) -> bool:
        """This row's L4T range holds ``l4t``."""
        return self.l4t_from <= l4t and (self.l4t_below is None or l4t < self.l4t_below)

    def module_fits(self, module: str | None) -> bool:
        """The module is one the row names, or unknown (a node label may be missing), or the row is not bound to its
        modules."""
        if not self.module_bound or module is None:
            return True
        return any(module == m or module.startswith(f"{m}-") for m in self.modules)


UPGRADE = "upgrade JetPack, or set EDGE_BACKEND=onnxruntime to serve on the CPU"
SUPPORT_MATRIX: tuple[JetPackRow, ...] = (
    JetPackRow("5.x", "r35", (35, 0), (36, 0), "8.5", (8, 5), (8, 6), "11.4", "3.8",
               ("orin-nano", "orin-nx", "agx-orin", "xavier-nx", "agx-xavier"), "sm_72 / sm_87", False,
               f"JetPack 5 ships TensorRT 8.5, older than any TensorRT this runtime builds for: {UPGRADE}"),
    JetPackRow("6.0", "r36.0-r36.3", (36, 0), (36, 4), "8.6", (8, 6), (8, 7), "12.2", "3.10", ORIN_MODULES, "sm_87",
               False, f"JetPack 6.0 ships TensorRT 8.6, which this runtime does not build for (it needs TensorRT "
                      f"10.3, JetPack 6.1/6.2): {UPGRADE}"),
    JetPackRow("6.1 / 6.2", "r36.4-r36.x", (36, 4), (37, 0), "10.3", (10, 3), (10, 4), "12.6", "3.10",
               ORIN_MODULES, "sm_87", True,
               "the `edge-runtime-jetson` image (from `l4t-tensorrt:r10.3.0-runtime`); strongly typed builds"),
    JetPackRow("7.0 / 7.1", "r38.x", (38, 0), (39, 0), "10.x", (10, 0), (11, 0), "13.0", "3.12", THOR_MODULES,
               "sm_110", True, "Thor with the TensorRT 10.x JetPack ships; no edgeloop image is published for it yet"),
    JetPackRow("7.2", "r39.x", (39, 0), None, "10.x", (10, 0), (11, 0), "13", "3.12", ORIN_MODULES + THOR_MODULES,
               "sm_87 / sm_110", True,
               "Orin and Thor with the TensorRT 10.x JetPack ships; no edgeloop image is published for it yet"),
    JetPackRow("7.2.2+", "r39.2+", (39, 2), None, "11.4.1+", (11, 4, 1), (12, 0), "13", "3.12",
               ("agx-orin", *THOR_MODULES), "sm_87 / sm_110", True,
               "TensorRT 11 on AGX Orin and Thor only (NVIDIA: 11.4.1 supports JetPack 7.2.2+ on those two); "
               "networks are strongly typed, no precision flags", module_bound=True),
    JetPackRow("7.x", "r38+", (38, 0), None, "11.0-11.4.0", (11, 0), (11, 4, 1), "13", "3.12", (), "-", False,
               "NVIDIA: TensorRT 11.0 to 11.4.0 do not support JetPack; stay on the TensorRT 10.x your JetPack "
               "ships, use TensorRT 11.4.1+ with JetPack 7.2.2+ (AGX Orin, Thor), or set EDGE_BACKEND=onnxruntime"),
)
"""NVIDIA's JetPack/TensorRT pairings and this runtime's verdict on each, first match wins (module-specific rows
before the catch-all ones)."""


def parse_version(text: str) -> Version:
    """``"10.3.0.30"`` → ``(10, 3, 0, 30)``; ``"36.4"`` → ``(36, 4)``; the leading numeric parts only."""
    parts: list[int] = []
    for part in text.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    if not parts:
        raise ConfigError(f"expected a version like 10.3.0.30, got {text!r}")
    return tuple(parts)


def support_row(l4t_release: str, trt_version: str, module: str | None = None) -> JetPackRow | None:
    """The row for this L4T release, TensorRT build and module, or ``None`` when no row names the combination."""
    l4t, trt = parse_version(l4t_release), parse_version(trt_version)
    for row in SUPPORT_MATRIX:
        if row.holds_for(l4t, trt) and row.module_fits(module):
            return row
    return None


def check_jetson_support(facts: DeviceFacts) -> JetPackRow | None:
    """The support-matrix row of this Jetson (``None`` when it is not a Jetson or has no TensorRT), or
    :class:`ConfigError` saying why this L4T release and TensorRT build are refused and what to do."""
    if facts.l4t_release is None or facts.trt_version is None:
        return None
    row = support_row(facts.l4t_release, facts.trt_version, facts.module)
    where = f"TensorRT {facts.trt_version} on L4T r{facts.l4t_release}"
    if row is not None and row.supported:
        return row
    if row is not None:
        raise ConfigError(f"{where} (JetPack {row.jetpack}) is refused: {row.note}")
    l4t, trt = parse_version(facts.l4t_release), parse_version(facts.trt_version)
    bound = [r for r in SUPPORT_MATRIX if r.holds_for(l4t, trt)]
    if bound:  # the pair is in the matrix, for other modules
        raise ConfigError(f"{where} is refused on this {facts.module}: NVIDIA supports TensorRT {bound[0].trt} on "
                          f"JetPack {bound[0].jetpack} only on {', '.join(bound[0].modules)}; stay on the TensorRT "
                          "10.x your JetPack ships, or set EDGE_BACKEND=onnxruntime")
    covering = [r for r in SUPPORT_MATRIX if r.l4t_covers(l4t) and r.module_fits(facts.module)]
    ships = [f"TensorRT {r.trt}" for r in covering if r.supported]
    if ships:
        raise ConfigError(f"{where} is not a supported combination: L4T r{facts.l4t_release} is JetPack "
                          f"{covering[0].jetpack}, which runs {' or '.join(ships)} here; install that TensorRT, or "
                          "set EDGE_BACKEND=onnxruntime")
    if covering:
        raise ConfigError(f"{where} is refused: L4T r{facts.l4t_release} is JetPack {covering[0].jetpack}, and "
                          f"{covering[0].note}")
    raise ConfigError(f"{where} is not in the JetPack support matrix (supported: " + "; ".join(
        f"TensorRT {r.trt} on JetPack {r.jetpack}" for r in SUPPORT_MATRIX if r.supported)
        + "): upgrade JetPack, or set EDGE_BACKEND=onnxruntime")
