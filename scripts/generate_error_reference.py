"""Write ``docs/errors.md``: the error tree drawn from the classes themselves, beside each error's gRPC status and
what the ``edgeloop`` command does with it.

Usage: ``python scripts/generate_error_reference.py [--out FILE]``. The page is committed; ``tests/test_errors_doc.py``
renders it again and fails on any difference, so it never drifts from ``edgeloop_core/errors.py``,
``edgeloop_core/rpc_errors.py`` (the status table, looked up along each class's MRO) and ``edgeloop/cli.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

from edgeloop_core import errors
from edgeloop_core.rpc_errors import STATUS_FOR, status_for

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "errors.md"
BRANCH_COLUMN = 36
"""Where the second column of a drawn tree starts (characters from the line's start)."""


def tree(root: type[errors.EdgeloopError] = errors.EdgeloopError) -> list[tuple[int, type[errors.EdgeloopError]]]:
    """``(depth, class)`` for ``root`` and every subclass below it, depth first, in definition order.

    Only classes of :mod:`edgeloop_core.errors` count: a package may narrow one of them for its own use (the
    cloud components' ``ModelRefused`` is a ``ConfigError``), and what is imported must not change the page.
    """
    found = [(0, root)]
    for child in root.__subclasses__():
        if child.__module__ == errors.__name__:
            found.extend((depth + 1, cls) for depth, cls in tree(child))
    return found


def summary(cls: type) -> str:
    """The first paragraph of ``cls``'s docstring as one line."""
    doc = (cls.__doc__ or "").strip()
    return " ".join(line.strip() for line in doc.split("\n\n", 1)[0].splitlines())


def grpc_status(cls: type[errors.EdgeloopError]) -> tuple[str, type[errors.EdgeloopError] | None]:
    """The status a gRPC caller gets for ``cls`` (through :func:`status_for`), and the row of
    :data:`STATUS_FOR` that decides it (``None``: no row, so INTERNAL with the message hidden)."""
    code, _ = status_for(cls("x"))
    row = next((c for c in cls.__mro__ if c in STATUS_FOR), None)
    return code.name, row


def cli_outcome(exc: BaseException) -> str:
    """What ``edgeloop`` does when a command raises ``exc``: the real :func:`edgeloop.cli.main` runs with a
    command that raises it."""
    from edgeloop import cli

    def command() -> None:
        raise exc

    app, cli.app = cli.app, command
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            cli.main()
    except SystemExit as done:
        lines = stderr.getvalue().strip().splitlines()
        said = "one line on stderr" if len(lines) == 1 else f"{len(lines)} lines on stderr"
        return f"exit {done.code}, {said}"
    except BaseException as escaped:  # that it escapes main() is the answer
        if escaped is not exc:
            raise
        return "exit 1, Python's traceback"  # the interpreter's status for an uncaught exception
    finally:
        cli.app = app
    return "exit 0"


def diagram(detail: str = "summary") -> list[str]:
    """The tree as box-drawing lines; beside each class its one-line summary (``detail="summary"``) or its gRPC
    status (``detail="status"``)."""
    lines: list[str] = []
    entries = tree()
    for index, (depth, cls) in enumerate(entries):
        prefix = ""
        for level in range(1, depth + 1):
            later = [d for d, _ in entries[index + 1 :]]
            # does a sibling at `level` still follow before the tree climbs above it?
            more = next((d == level for d in later if d <= level), False)
            if level == depth:
                prefix += "├── " if more else "└── "
            else:
                prefix += "│   " if more else "    "
        note = summary(cls) if detail == "summary" else grpc_status(cls)[0]
        lines.append(f"{prefix}{cls.__name__}".ljust(BRANCH_COLUMN) + note)
    return lines


def docstring_diagram() -> str:
    """The diagram as ``edgeloop_core/errors.py``'s docstring draws it (a literal block: indented 4 spaces)."""
    return "\n".join("    " + line for line in diagram("status")) + "\n"


def _markdown(text: str) -> str:
    """A docstring's reStructuredText literals (double backquotes) as Markdown code."""
    return text.replace("``", "`")


def _status_cell(cls: type[errors.EdgeloopError]) -> str:
    code, row = grpc_status(cls)
    if row is None:
        return f"`{code}` (message hidden)"
    return f"`{code}`" if row is cls else f"`{code}` (as `{row.__name__}`)"


def render() -> str:
    """The whole page, Markdown."""
    entries = tree()
    branches = [cls for depth, cls in entries if depth == 1]
    mapped = [f"`{cls.__name__}`" for cls in branches if cls in STATUS_FOR]
    branch_list = "\n".join(f"- `{cls.__name__}`: {_markdown(summary(cls))}" for cls in branches)
    drawn = "\n".join(f"{'    ' * depth}- **`{cls.__name__}`** — {_markdown(summary(cls))}" for depth, cls in entries)
    rows = [f"| `{cls.__name__}` | {_status_cell(cls)} | {cli_outcome(cls('x'))} |" for _, cls in entries]
    rows.append(f"| anything else (a bug, a third-party error) | `{status_for(RuntimeError())[0].name}` "
                f"(message hidden) | {cli_outcome(RuntimeError('x'))} |")
    return f"""# Errors

<!-- Generated by scripts/generate_error_reference.py from edgeloop_core/errors.py, edgeloop_core/rpc_errors.py
and edgeloop/cli.py; do not edit by hand (tests/test_errors_doc.py fails when this page is stale). -->

Every error edgeloop raises on purpose is an `EdgeloopError`, defined in `edgeloop_core/errors.py`; errors from
boto3, ONNX Runtime, TensorRT or Kubernetes are wrapped into one of them where they enter, with the cause kept
(`raise ... from exc`) and a message that says what to do next. The tree has one branch per part of the loop:

{branch_list}

Catch the narrowest class you can handle (`except ObjectNotFound`); a branch is there to find your way, and of
the branches only {" and ".join(mapped) or "none"} carry a gRPC status of their own.

## The tree

{drawn}

## What a caller sees

Both gRPC servers (the device's inference server and the telemetry hub) map every error escaping a call through one
table, `STATUS_FOR` in `edgeloop_core/rpc_errors.py`, looked up along the class's MRO: a class without a row takes
its nearest mapped ancestor's status ("as ..."), and one with none answers `INTERNAL` with a fixed message (the
details go to the server's log). The `edgeloop` command prints any `EdgeloopError` as one line, without a
traceback, and exits with status 1.

| error | gRPC status | `edgeloop` command |
|---|---|---|
{chr(10).join(rows)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PAGE)
    out = parser.parse_args().out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
    sys.stdout.write(f"wrote {out}\n")


if __name__ == "__main__":
    main()
