"""Generate ``docs/configuration.md``, the configuration reference, from the settings classes and the Helm charts.

Usage: ``python scripts/generate_config_reference.py [--out FILE]``. Every field of ``EdgeSettings`` (and its nested
``ModelEntry``) and of ``HubSettings`` gets a row: its environment variable, the chart value that sets it (read from
the chart's templates: the container's ``env`` entries, the volumes they point into, and the desired-state helper),
its default, its unit (from the name's suffix) and its description. The page is committed; the test suite renders it
again and fails on any difference (``tests/test_docs.py``), so it cannot drift from the code or the charts.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

if TYPE_CHECKING:
    from pydantic import BaseModel
    from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"
EDGE_CHART = ROOT / "helm" / "edge-runtime"
HUB_CHART = ROOT / "helm" / "telemetry-hub"

# Units by the name's suffix, as STYLE.md asks names to carry them (``queue_delay_us``, ``cache_max_bytes``).
UNIT_SUFFIXES = (
    ("_bytes", "bytes"), ("_mib", "MiB"), ("_us", "µs"), ("_ms", "ms"), ("_s", "seconds"), ("_hours", "hours"),
    ("_days", "days"),
    ("_events", "events"), ("_attempts", "attempts"), ("_batch_size", "samples"), ("_rpcs", "calls"),
    ("_threads", "threads"),
)

_CONTROL = re.compile(r"^\s*\{\{-?\s*(if|with|range|else|end)\b\s*(.*?)\s*-?\}\}\s*$")
_VALUES_REF = re.compile(r"\$?\.Values\.([\w.]+)")
_ENV_NAME = re.compile(r"^(\s*)- name:\s*(\w+)\s*$")
_DOT = re.compile(r"\{\{-?\s*\.\s*(?:\|[^}]*)?-?\}\}")


# --- what a chart template says about the environment


@dataclass(frozen=True)
class Frame:
    """An open control block in a template: ``if``/``with``/``range`` and its expression; ``negated`` after ``else``."""

    kind: str
    expr: str
    negated: bool = False

    def refs(self) -> list[str]:
        """The chart values the expression reads."""
        return _VALUES_REF.findall(self.expr)


@dataclass
class EnvEntry:
    """One ``- name: VAR`` entry of a container's ``env``, with the blocks it sits in."""

    name: str
    frames: tuple[Frame, ...]
    lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Volume:
    """A pod volume: the chart values that choose it, and whether it is the chart's own ConfigMap."""

    refs: tuple[str, ...]
    own_configmap: bool


def _blocks(lines: list[str]) -> list[tuple[str, tuple[Frame, ...]]]:
    """Each non-control line with the control blocks open around it."""
    stack: list[Frame] = []
    out: list[tuple[str, tuple[Frame, ...]]] = []
    for line in lines:
        match = _CONTROL.match(line)
        if match is None:
            out.append((line, tuple(stack)))
            continue
        kind, expr = match.groups()
        if kind == "end":
            stack.pop()
        elif kind == "else":
            top = stack.pop()
            stack.append(Frame(top.kind, top.expr, negated=True))
        else:
            stack.append(Frame(kind, expr))
    return out


def _section(lines: list[str], key: str) -> list[str]:
    """The lines of every ``key:`` block (each container's, for ``env`` or ``volumeMounts``), the key's own line
    excluded, control lines inside them included."""
    body: list[str] = []
    for i, line in enumerate(lines):
        if line.strip() == f"{key}:":
            indent = len(line) - len(line.lstrip())
            for following in lines[i + 1:]:
                stripped = following.lstrip()
                if stripped and not _CONTROL.match(following) and len(following) - len(stripped) <= indent:
                    break
                body.append(following)
    return body


def _with_value(frames: tuple[Frame, ...]) -> str | None:
    """What ``.`` means inside these blocks: the chart value of the innermost ``with``."""
    for frame in reversed(frames):
        if frame.kind == "with" and frame.refs():
            return frame.refs()[0]
    return None


def _env_entries(template: list[str]) -> tuple[list[EnvEntry], str | None]:
    """The container's ``env`` entries, and the chart value whose items are added verbatim (``extraEnv``)."""
    entries: list[EnvEntry] = []
    extra: str | None = None
    for line, frames in _blocks(_section(template, "env")):
        match = _ENV_NAME.match(line)
        if match is not None:
            entries.append(EnvEntry(match.group(2), frames))
        elif "toYaml ." in line:
            extra = _with_value(frames)
        elif entries:
            entries[-1].lines.append(line)
    return entries, extra


def _volumes(template: list[str]) -> tuple[dict[str, str], dict[str, Volume]]:
    """Mount path → volume name (the container's ``volumeMounts``), and volume name → :class:`Volume`."""
    mounts: dict[str, str] = {}
    name: str | None = None
    for line in _section(template, "volumeMounts"):
        if (match := re.match(r"^\s*- name:\s*(\S+)", line)) is not None:
            name = match.group(1)
        elif (match := re.match(r"^\s*mountPath:\s*(\S+)", line)) is not None and name is not None:
            mounts[match.group(1)] = name
    volumes: dict[str, Volume] = {}
    current: tuple[str, list[str], set[str]] | None = None
    for line, frames in [*_blocks(_section(template, "volumes")), ("- name: end", ())]:
        match = re.match(r"^\s*- name:\s*(\S+)", line)
        if match is not None:
            if current is not None:
                refs = tuple(dict.fromkeys(current[1]))
                volumes[current[0]] = Volume(refs, "configMap:" in current[2] and "include" in " ".join(current[2]))
            enclosing = [ref for frame in frames for ref in frame.refs()]
            current = (match.group(1), enclosing, set())
        elif current is not None:
            current[2].add(line.strip())
            current[1].extend(ref for frame in frames for ref in frame.refs())
            current[1].extend(_VALUES_REF.findall(line))
            if _DOT.search(line) and (dot := _with_value(frames)) is not None:
                current[1].append(dot)
    return mounts, volumes


def _condition(frame: Frame, values: dict[str, Any]) -> str:
    """A control block's test as words: ``serving.engine: triton``, ``tls.mutual`` is true, ``hub.tlsSecret`` is set,
    ``batching.latencyBudgetMs`` > 0 (``values``: the chart's ``values.yaml``, to tell flags from strings)."""
    expr = frame.expr
    if (match := re.fullmatch(r'eq \$?\.Values\.([\w.]+) "([^"]*)"', expr)) is not None:
        return f"`{match.group(1)}: {match.group(2)}`"
    if (match := re.fullmatch(r"gt \(\w+ \$?\.Values\.([\w.]+)\) ([\d.]+)", expr)) is not None:
        return f"`{match.group(1)}` > {float(match.group(2)):g}"
    if (match := re.fullmatch(r"\$?\.Values\.([\w.]+)", expr)) is not None:
        path = match.group(1)
        value: Any = values
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return f"`{path}` is true" if isinstance(value, bool) else f"`{path}` is set"
    return f"`{expr}`"


def _conditions(frames: list[Frame], values: dict[str, Any]) -> str:
    """The blocks around an entry as one clause: `` when A and B unless C``."""
    when = [_condition(frame, values) for frame in frames if not frame.negated]
    unless = [_condition(frame, values) for frame in frames if frame.negated]
    return "".join(f" {word} {' and '.join(parts)}" for word, parts in (("when", when), ("unless", unless)) if parts)


def _entry_source(entry: EnvEntry, mounts: dict[str, str], volumes: dict[str, Volume]) -> tuple[str, set[str]]:
    """Where one env entry's value comes from, in words, and the chart values that names."""
    body = "\n".join(entry.lines)
    if (match := re.search(r"fieldPath:\s*(\S+)", body)) is not None:
        return f"the pod's `{match.group(1)}`", set()
    if "secretKeyRef" in body:
        name_line = re.search(r"^\s*name:\s*(.*)$", body, flags=re.M)
        key = re.search(r"^\s*key:\s*(\S+)", body, flags=re.M)
        refs = _VALUES_REF.findall(name_line.group(1)) if name_line else []
        if not refs and name_line and _DOT.search(name_line.group(1)):
            refs = [ref for ref in [_with_value(entry.frames)] if ref]
        where = ", ".join(f"`{ref}`" for ref in refs)
        return f"{where} (a Secret, key `{key.group(1) if key else '?'}`)", set(refs)
    value = re.search(r"^\s*value:\s*(.*)$", body, flags=re.M)
    text = value.group(1).strip() if value else ""
    refs = _VALUES_REF.findall(text)
    if refs:
        return ", ".join(f"`{ref}`" for ref in refs), set(refs)
    if _DOT.search(text) and (dot := _with_value(entry.frames)) is not None:
        return f"`{dot}`", {dot}
    literal = text.strip('"')
    under = [path for path in mounts if literal == path or literal.startswith(path.rstrip("/") + "/")]
    if under:
        volume = volumes.get(mounts[max(under, key=len)], Volume((), False))
        if volume.refs:
            origin = ", ".join(f"`{ref}`" for ref in volume.refs)
        elif volume.own_configmap:
            origin = "the chart's ConfigMap"
        else:
            origin = "the pod"
        return f"fixed `{literal}`, a volume from {origin}", set(volume.refs)
    return f"fixed `{literal}`", set()


@dataclass(frozen=True)
class Chart:
    """What one chart sets: env variable → words (``env``) and the chart values those words name (``named``);
    setting → chart value for what the desired file carries (``desired``), model-entry key → item key
    (``entry_keys``); and the value whose items become env entries verbatim (``extra_env``)."""

    name: str
    env: dict[str, str]
    named: dict[str, tuple[str, ...]]
    desired: dict[str, str]
    entry_keys: dict[str, str]
    extra_env: str | None


def read_chart(chart: Path, workload: str) -> Chart:
    """Read the chart's ``templates/<workload>`` (and, for the edge runtime, the desired-state helper)."""
    import yaml

    template = (chart / "templates" / workload).read_text().splitlines()
    values = yaml.safe_load((chart / "values.yaml").read_text()) or {}
    entries, extra = _env_entries(template)
    mounts, volumes = _volumes(template)
    env: dict[str, list[str]] = {}
    named: dict[str, list[str]] = {}
    for entry in entries:
        source, refs = _entry_source(entry, mounts, volumes)
        # a block that only tests the value the entry already names says nothing more
        tests = [frame for frame in entry.frames
                 if frame.kind in ("if", "with") and not (frame.refs() and set(frame.refs()) <= refs)]
        env.setdefault(entry.name, []).append(source + _conditions(tests, values))
        named.setdefault(entry.name, []).extend([*sorted(refs), *(ref for frame in tests for ref in frame.refs())])
    desired, entry_keys = _desired_keys(chart)
    return Chart(chart.name, {name: "; ".join(dict.fromkeys(parts)) for name, parts in env.items()},
                 {name: tuple(dict.fromkeys(refs)) for name, refs in named.items()}, desired, entry_keys, extra)


def _desired_keys(chart: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Settings the chart writes into the desired file (``<chart>.desired`` in ``_helpers.tpl``): setting → value,
    and each model entry's key → the item key of the list value it ranges over."""
    helpers = chart / "templates" / "_helpers.tpl"
    if not helpers.exists():
        return {}, {}
    text = helpers.read_text()
    start = text.find(f'define "{chart.name}.desired"')
    if start < 0:
        return {}, {}
    end = text.find("{{- define", start + 1)
    body = text[start:end if end > 0 else len(text)]
    ranged = re.search(r"range \$?\.Values\.([\w.]+)", body)
    desired: dict[str, str] = {}
    entry_keys: dict[str, str] = {}
    pair = re.compile(r'"([a-z_]+)"\s*:?\s*(?:\{\{-?\s*)?\(?(?:(?:int|int64|float64|default\s+"[^"]*")\s+)?'
                      r"(\$?\.Values\.[\w.]+|\.\w+|\$\w+)")
    for key, source in pair.findall(body):
        if (ref := _VALUES_REF.fullmatch(source)) is not None:
            desired[key] = ref.group(1)
        elif source.startswith("$") and ranged is not None:
            desired[key] = ranged.group(1)
        elif ranged is not None:
            entry_keys[key] = f"{ranged.group(1)}[].{source[1:]}"
    return desired, entry_keys


# --- what a settings class says about each field


def unit(name: str) -> str:
    """The unit a setting's name carries in its suffix (``poll_interval_s`` → seconds), else ``—``."""
    return next((word for suffix, word in UNIT_SUFFIXES if name.endswith(suffix)), "—")


def bounds(info: FieldInfo) -> str:
    """The field's numeric limits (``> 0``, ``≥ 0, ≤ 65535``), or empty."""
    words = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}
    return ", ".join(f"{sign} {getattr(item, attr)}" for item in info.metadata for attr, sign in words.items()
                     if hasattr(item, attr))


def default(name: str, info: FieldInfo) -> str:
    """The default as the page shows it: unset, empty, a factory's call, or the value (bytes also in KiB/MiB/GiB)."""
    if info.default_factory is not None:
        factory: Any = info.default_factory
        if factory in (list, dict, tuple):
            return "empty"
        # a function from a C module names its private module (socket.gethostname: _socket)
        return f"`{factory.__module__.lstrip('_')}.{factory.__qualname__}()`"
    value = info.default
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, int) and name.endswith("_bytes"):
        for size, word in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if value >= size and value % size == 0:
                return f"`{value}` ({value // size} {word})"
    return f"`{value}`"


def describe(info: FieldInfo) -> str:
    """The field's description, with its choices for a ``Literal``; safe inside a table cell."""
    text = (info.description or "").strip()
    if get_origin(info.annotation) is Literal:
        text += f"; one of {', '.join(f'`{choice}`' for choice in get_args(info.annotation))}"
    return text.replace("|", "\\|")


def sections(settings: type[BaseModel]) -> dict[str, str]:
    """Field name → the ``# --- section`` comment above it in the class source (empty where there is none)."""
    current = ""
    found: dict[str, str] = {}
    for line in inspect.getsource(settings).splitlines():
        stripped = line.strip()
        if stripped.startswith("# ---"):
            current = stripped.removeprefix("# ---").strip()
        elif (match := re.match(r"^\s+(\w+)\s*:", line)) is not None and match.group(1) in settings.model_fields:
            found[match.group(1)] = current
    return found


def _rst(text: str) -> str:
    """reStructuredText literals and roles (````x````, ``:class:`x```) as Markdown code."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _cell(text: str) -> str:
    return text if text else "—"


def settings_tables(settings: type[BaseModel], chart: Chart, prefix: str) -> list[str]:
    """One table per section of ``settings``: variable, chart value, default, unit, description."""
    out: list[str] = []
    by_section: dict[str, list[str]] = {}
    where = sections(settings)
    for name, info in settings.model_fields.items():
        variable = f"{prefix}{name.upper()}"
        if variable in chart.env:
            chart_value = chart.env[variable]
        elif name in chart.desired:
            chart_value = f"`{chart.desired[name]}` (in the desired file)"
        else:
            chart_value = ""
        limits = bounds(info)
        units = unit(name) if not limits else f"{unit(name)} ({limits})" if unit(name) != "—" else limits
        row = f"| `{variable}` | {_cell(chart_value)} | {default(name, info)} | {units} | {describe(info)} |"
        by_section.setdefault(where.get(name, ""), []).append(row)
    for section, rows in by_section.items():
        if section:
            title, _, note = section.partition(" (")
            out += [f"### {title[0].upper()}{title[1:]}", ""]
            if note:
                note = note.removesuffix(")")
                out += [f"{note[0].upper()}{note[1:]}.", ""]
        out += [f"| variable | chart value (`helm/{chart.name}`) | default | unit | description |",
                "|---|---|---|---|---|", *rows, ""]
    return out


def entry_table(entry: type[BaseModel], chart: Chart) -> list[str]:
    """The keys of one model entry: JSON key, chart value, default, unit, description."""
    rows = ["| key | chart value (`helm/edge-runtime`) | default | unit | description |", "|---|---|---|---|---|"]
    for name, info in entry.model_fields.items():
        chart_value = f"`{chart.entry_keys[name]}`" if name in chart.entry_keys else ""
        limits = bounds(info)
        units = unit(name) if not limits else f"{unit(name)} ({limits})" if unit(name) != "—" else limits
        shown = "required" if info.is_required() else default(name, info)
        rows.append(f"| `{name}` | {_cell(chart_value)} | {shown} | {units} | {describe(info)} |")
    return [*rows, ""]


def render() -> str:
    """The whole page, as committed in ``docs/configuration.md``."""
    from edge_runtime import settings as edge_settings
    from edge_runtime.settings import EdgeSettings, ModelEntry
    from telemetry_hub.server import HubSettings

    edge = read_chart(EDGE_CHART, "daemonset.yaml")
    hub = read_chart(HUB_CHART, "deployment.yaml")
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/generate_config_reference.py from edge_runtime/settings.py, "
        "telemetry_hub/server.py and the charts' templates; do not edit: run "
        "`.venv/bin/python scripts/generate_config_reference.py` (tests/test_docs.py fails on any difference). -->",
        "",
        "Every setting, its environment variable, the Helm chart value that sets it (— where the chart sets none), "
        "its default, unit and meaning. *fixed* means the chart always sets that value (a path inside the pod, "
        "where the chart mounts a volume); *the desired file* is the JSON the chart writes into its ConfigMap and "
        "the runtime watches (`EDGE_DESIRED_FILE`).",
        "",
        "## Edge runtime (`edgeloop edge serve`)",
        "",
        _rst(inspect.getdoc(edge_settings) or ""),
        "",
        _rst(inspect.getdoc(EdgeSettings) or ""),
    ]
    if edge.extra_env:
        lines += ["", f"Any variable the chart does not set can be given through its `{edge.extra_env}` value."]
    lines += ["", *settings_tables(EdgeSettings, edge, EdgeSettings.model_config.get("env_prefix", ""))]
    lines += [
        "### Model entries",
        "",
        "Each item of `EDGE_MODELS` (JSON), of the desired file's `models`, and of the chart's `models` value:",
        "",
        _rst(inspect.getdoc(ModelEntry) or ""),
        "",
        *entry_table(ModelEntry, edge),
        "## Telemetry hub (`edgeloop hub serve`)",
        "",
        _rst(inspect.getdoc(HubSettings) or ""),
        "",
        *settings_tables(HubSettings, hub, HubSettings.model_config.get("env_prefix", "")),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PAGE)
    out = parser.parse_args().out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
    sys.stdout.write(f"wrote {out}\n")


if __name__ == "__main__":
    main()
