"""Where a benchmark's results go: its own section of ``bench/README.md``, replaced whole at the end of a run.

Each benchmark owns the lines between two marker lines of the README::

    <!-- bench:serve:begin -->
    Last full run: `.venv/bin/python bench/serve.py --profile`, 2026-11-26, on 2 cores (...), no GPU, 3.4 min. ...
    | model | server | ... |
    <!-- bench:serve:end -->

:func:`write_section` replaces what lies between them and nothing else (every other byte of the file stays as it
was), through a temporary file beside the README and a rename, so a reader or a crash sees the old file or the new
one, never half of one. :class:`BenchRun` gives every benchmark the same ``--quick``, ``--readme`` and ``--plot``
options and the section's first line (the command, the date, the machine, how long it took). A ``--quick`` run (the
smallest run that still starts every part) writes into a copy of the README in the temporary folder, never into the
recorded one.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "bench" / "README.md"
QUICK_DIR = Path(tempfile.gettempdir()) / "edgeloop-bench"
"""Where a ``--quick`` run writes its copy of the README and its plot (unless ``--readme``/``--plot`` say)."""


class SectionError(ValueError):
    """The README's markers for a section are missing, repeated or out of order, or a new body carries a marker:
    nothing was written."""


def markers(name: str) -> tuple[str, str]:
    """The begin and end marker lines (without the newline) of benchmark ``name``'s section."""
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def _marker_lines(lines: list[str], marker: str) -> list[int]:
    """Indexes of the lines that are exactly ``marker`` (trailing ``\\n``/``\\r\\n`` aside): a marker quoted inside a
    sentence or a code span does not count."""
    return [i for i, line in enumerate(lines) if line.rstrip("\r\n") == marker]


def replace_section(text: str, name: str, body: str, where: str = "the README") -> str:
    """``text`` with the lines between ``name``'s marker lines replaced by ``body`` (a newline is added when it
    lacks one); every byte outside them is kept. :class:`SectionError` when either marker is missing or repeated,
    the end comes before the begin, or ``body`` holds a marker line of any section (it would corrupt the file)."""
    begin, end = markers(name)
    lines = text.splitlines(keepends=True)
    found = {marker: _marker_lines(lines, marker) for marker in (begin, end)}
    for marker, at in found.items():
        if len(at) != 1:
            how = "no line" if not at else f"{len(at)} lines (at lines {', '.join(str(i + 1) for i in at)})"
            raise SectionError(f"{where} has {how} '{marker}': the section of benchmark {name!r} needs exactly one "
                               f"'{begin}' line and, after it, one '{end}' line")
    first, last = found[begin][0], found[end][0]
    if last < first:
        raise SectionError(f"{where}: '{end}' (line {last + 1}) comes before '{begin}' (line {first + 1})")
    for line in body.splitlines():
        stripped = line.strip()
        if stripped.startswith("<!-- bench:") and stripped.endswith(("begin -->", "end -->")):
            raise SectionError(f"the new body of section {name!r} holds a marker line ({stripped}): refused, it would "
                               f"split or nest sections in {where}")
    if body and not body.endswith("\n"):
        body += "\n"
    newline = "\r\n" if lines[first].endswith("\r\n") else "\n"
    if newline != "\n":
        body = body.replace("\n", newline)
    return "".join(lines[: first + 1]) + body + "".join(lines[last:])


def write_section(readme: Path, name: str, body: str) -> None:
    """Replace benchmark ``name``'s section of ``readme`` with ``body`` (see :func:`replace_section`), atomically:
    the new file is written beside it, fsync'ed and renamed over it (the file's mode kept). On any error ``readme``
    is left as it was, byte for byte."""
    from edgeloop_core.files import atomic_output

    old = readme.read_bytes()
    new = replace_section(old.decode("utf-8"), name, body, where=str(readme))
    mode = readme.stat().st_mode & 0o7777
    with atomic_output(readme) as tmp:
        tmp.write_bytes(new.encode("utf-8"))
        os.chmod(tmp, mode)


def command_line(argv: Sequence[str], python: str = sys.executable) -> str:
    """How this run was started, as one copyable line: ``.venv/bin/python bench/serve.py --profile`` (paths inside
    the repository relative to its root)."""

    def relative(path: str) -> str:
        try:
            return str(Path(path).absolute().relative_to(ROOT))
        except ValueError:
            return path

    return shlex.join([relative(python), relative(argv[0]), *argv[1:]])


def machine() -> str:
    """This machine in a few words: cores, CPU model, GPUs (``nvidia-smi``), e.g. ``2 cores (AMD EPYC), no GPU``."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = "no GPU"
    if shutil.which("nvidia-smi"):
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=20, check=True).stdout.split("\n")
            found = [n.strip() for n in names if n.strip()]
            if found:
                gpus = ", ".join(found)
        except (OSError, subprocess.SubprocessError):
            pass
    cores = f"{os.cpu_count() or 1} cores" + (f" ({model})" if model else "")
    return f"{cores}, {gpus}"


def shown(path: Path) -> str:
    """``path`` as the README shows it: relative to the repository root when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


@dataclass
class BenchRun:
    """One run of benchmark ``name``: where its section and plot go, and what its section's first line says.

    Make it with :meth:`from_args` after :meth:`add_options` and ``parse_args``; call :meth:`finish` with the
    tables at the end of the run."""

    name: str
    readme: Path
    plot: Path
    quick: bool
    argv: list[str] = field(default_factory=lambda: list(sys.argv))
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    started: float = field(default_factory=time.monotonic)

    @staticmethod
    def add_options(parser: argparse.ArgumentParser, name: str) -> None:
        """``--quick``, ``--readme PATH`` and ``--plot PATH`` on ``parser``, the same for every benchmark."""
        parser.add_argument("--quick", action="store_true",
                            help="the smallest run that still starts every part, to check the benchmark works; "
                                 f"writes into a copy of bench/README.md under {QUICK_DIR}, never the recorded one")
        parser.add_argument("--readme", type=Path, default=None,
                            help=f"the README whose '{markers(name)[0]}' section this run replaces "
                                 f"(default: bench/README.md; with --quick, a copy under {QUICK_DIR})")
        parser.add_argument("--plot", type=Path, default=None,
                            help=f"where the plot goes (default: bench/{name}.png; with --quick, under {QUICK_DIR})")

    @classmethod
    def from_args(cls, name: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchRun:
        """Resolve ``--quick``/``--readme``/``--plot``: a quick run gets a fresh copy of the README (and a plot path)
        under :data:`QUICK_DIR` and may not name the recorded README (its numbers come from full runs only)."""
        readme, plot = args.readme, args.plot
        if args.quick:
            if readme is not None and readme.resolve() == README.resolve():
                parser.error("a --quick run never writes bench/README.md: its tables are from full runs")
            QUICK_DIR.mkdir(parents=True, exist_ok=True)
            if readme is None:
                readme = QUICK_DIR / "README.md"
                shutil.copyfile(README, readme)
            plot = plot or QUICK_DIR / f"{name}.png"
        readme = readme or README
        plot = plot or ROOT / "bench" / f"{name}.png"
        if not readme.exists():
            parser.error(f"{readme} does not exist (copy bench/README.md there first)")
        body = readme.read_text(encoding="utf-8")
        replace_section(body, name, "", where=str(readme))  # its markers are checked now, not after an hour's run
        return cls(name, readme, plot, args.quick)

    def header(self) -> str:
        """The section's first line: command, date, machine, duration, plot."""
        minutes = (time.monotonic() - self.started) / 60
        kind = "Quick run (a check that the benchmark works, not a measurement)" if self.quick else "Last full run"
        return (f"{kind}: `{command_line(self.argv)}`, {self.started_at:%Y-%m-%d}, on {machine()}, "
                f"{minutes:.1f} min. Plot: `{shown(self.plot)}`.")

    def finish(self, tables: str) -> None:
        """Write ``tables`` under :meth:`header` into this benchmark's section of the README."""
        write_section(self.readme, self.name, f"{self.header()}\n\n{tables.strip()}\n")
        print(f"wrote the {self.name!r} section of {self.readme} and {self.plot}")
