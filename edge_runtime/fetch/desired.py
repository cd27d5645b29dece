"""Desired state: which models should serve, each at which version or channel, and nothing else.

Precedence, highest first: what ``RepositoryModelLoad`` pinned (repository control: a version or channel for one
model, or a model the other sources do not list), the desired file (``EDGE_DESIRED_FILE``: the Helm ConfigMap
volume, re-read every cycle and watched for edits), the settings (``EDGE_MODELS``, or ``EDGE_MODEL_NAME`` and
``EDGE_MODEL_VERSION`` for the one-model case). Every name and version passes the one name pattern.

The desired file holds either ``{"models": [{"name": ..., "version": ..., ...}, ...]}`` or, as before several
models, ``{"model_name": ..., "model_version": ...}``.

Field capture (docs/capture.md) is set in the same place: a model entry may carry ``capture: {...}`` (a
:class:`~edgeloop_core.contract.captures.CapturePolicy`; without one the model is not captured), and the file's
top-level ``capture: {...}`` (:class:`~edgeloop_core.contract.captures.CaptureSettings`) holds the device-wide
settings, ``enabled: false`` turning capture off whatever the models say. A model's channel pointer may carry a
policy too (signed with it, set from the cloud by ``edgeloop pipeline set-capture``): the device uses it only from
a pointer it accepted, and only for a model that neither the desired file nor the settings give a policy: the
local policy wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edge_runtime.fetch.cache import POINTER_CAPTURE_FILE, load_pointer_captures
from edge_runtime.settings import EdgeSettings, ModelEntry, read_settings_file, unique_models
from edgeloop_core.contract import check_name
from edgeloop_core.contract.captures import CapturePolicy, CaptureSettings
from edgeloop_core.errors import ConfigError


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"


def capture_from(data: dict[str, Any], where: str) -> tuple[CaptureSettings | None, dict[str, CapturePolicy]]:
    """The device-wide capture settings (``None``: the file sets none) and each model's capture policy that a
    desired-file mapping holds; a bad block is a ConfigError naming it."""
    try:
        settings = CaptureSettings.model_validate(data["capture"]) if data.get("capture") is not None else None
    except ValidationError as exc:
        raise ConfigError(f"capture {where}: {_first_error(exc)}") from exc
    policies: dict[str, CapturePolicy] = {}
    items = data.get("models")
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict) and item.get("capture") is not None:
            try:
                policies[str(item.get("name"))] = CapturePolicy.model_validate(item["capture"])
            except ValidationError as exc:
                raise ConfigError(f"models {where}: {item.get('name')}: capture.{_first_error(exc)}") from exc
    return settings, policies


def entries_from(data: dict[str, Any], where: str, default: list[ModelEntry]) -> list[ModelEntry]:
    """The models a desired-file mapping names (``default`` when it names none); a bad entry is a ConfigError."""
    if "models" in data:
        items = data["models"]
        if not isinstance(items, list):
            raise ConfigError(f"models {where} must be a list of {{name, version, ...}}")
        try:
            return unique_models([ModelEntry.model_validate(_without_capture(item)) for item in items])
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"models {where}: {field}: {first['msg']}") from exc
        except ValueError as exc:
            raise ConfigError(f"models {where}: {exc}") from exc
    if "model_name" in data or "model_version" in data:
        base = default[0]
        name = check_name(data.get("model_name", base.name), f"model_name {where}")
        version = check_name(data.get("model_version", base.version), f"model_version {where}")
        return [ModelEntry(name=name, version=version, variant=base.variant if name == base.name else None)]
    return default


def _without_capture(item: object) -> object:
    """A model entry without its ``capture`` block (read by :func:`capture_from`)."""
    return {k: v for k, v in item.items() if k != "capture"} if isinstance(item, dict) else item


class DesiredModels:
    """Answers "which models, each at which version or channel?" from the sources above."""

    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self.pinned: dict[str, str | None] = {}
        """Models ``RepositoryModelLoad`` named: a pinned version or channel, or ``None`` (follow the other sources,
        or ``stable`` for a model they do not list)."""
        self.current: dict[str, ModelEntry] = {e.name: e for e in settings.desired_models()}
        """What :meth:`read` answered last (insertion order: the order the sources list them)."""
        self._seen: tuple[int, int, int] | None = None
        self._capture: tuple[object, tuple[CaptureSettings, dict[str, CapturePolicy]]] | None = None
        """The desired file's and the pointer policies' signatures, and the capture configuration read from them."""

    def file_signature(self) -> tuple[int, int, int] | None:
        """The desired file's (modification time, size, inode): a Kubernetes ConfigMap update swaps the file, an edit
        in place changes its time or size (``None``: no file, or it is being replaced right now)."""
        path = self.settings.desired_file
        try:
            stat = Path(path).stat() if path else None
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino) if stat else None

    def changed(self) -> bool:
        """Whether the desired file changed since :meth:`mark_seen` (the repository's watcher marks the file seen
        before it reads it; the models' own reads do not, so none of them can hide a change from the watcher)."""
        return self.file_signature() != self._seen

    def mark_seen(self) -> None:
        """Remember the file's current state without reading it."""
        self._seen = self.file_signature()

    def read(self) -> dict[str, ModelEntry]:
        """Model name → entry, by the precedence in the module docstring (a malformed file: ConfigError)."""
        entries = self.settings.desired_models()
        path = self.settings.desired_file
        if path is not None and Path(path).exists():
            data = read_settings_file(Path(path))
            if not data:  # an empty file is one being written in place: never read as "nothing desired"
                raise ConfigError(f"the desired file {path} is empty")
            entries = entries_from(data, f"in {path}", entries)
        desired = {e.name: e for e in entries}
        for name, version in self.pinned.items():
            entry = desired.get(name) or ModelEntry(name=name)
            desired[name] = entry.model_copy(update={"version": version}) if version else entry
        self.current = desired
        return desired

    def entry(self, name: str) -> ModelEntry | None:
        """``name``'s entry as :meth:`read` answers now (``None``: no longer desired)."""
        return self.read().get(name)

    def pin(self, name: str, version: str | None) -> None:
        """Serve ``name`` (added when no source lists it); pin ``version`` (a version or channel), or with ``None``
        clear a pin and follow the other sources."""
        check_name(name, "model name")
        self.pinned[name] = check_name(version, "version") if version else None

    def capture_configuration(self) -> tuple[CaptureSettings, dict[str, CapturePolicy]]:
        """The device-wide capture settings and each desired model's capture policy (models without one are not
        captured): the desired file's over the settings' ``models`` entries, and for a model neither sets one for,
        its accepted channel pointer's; re-parsed only when the file or the pointers' policies changed. A malformed
        file is a ConfigError (the caller keeps what it had)."""
        file_signature = self.file_signature()
        signature = (file_signature, self._pointer_signature())
        if self._capture is not None and self._capture[0] == signature:
            return self._capture[1]
        settings, policies = self._local_capture(file_signature)
        for name, raw in load_pointer_captures(self._cache_root()).items():
            if name not in policies:
                try:
                    policies[name] = CapturePolicy.model_validate(raw)
                except ValidationError as exc:  # recorded by an older runtime: the pointer is read again next cycle
                    raise ConfigError(f"capture policy of {name} from its channel pointer: {_first_error(exc)}") \
                        from exc
        self._capture = (signature, (settings, policies))
        return settings, policies

    def _cache_root(self) -> Path:
        return Path(self.settings.cache_dir).expanduser()

    def _pointer_signature(self) -> tuple[int, int, int] | None:
        """(modification time, size, inode) of the pointer policies' file (``None``: none recorded)."""
        try:
            stat = (self._cache_root() / POINTER_CAPTURE_FILE).stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def _local_capture(self, signature: object) -> tuple[CaptureSettings, dict[str, CapturePolicy]]:
        """The capture settings and policies of the desired file and the settings (``signature``: the file's)."""
        settings, policies = CaptureSettings(), {
            e.name: e.capture for e in self.settings.desired_models() if getattr(e, "capture", None) is not None}
        path = self.settings.desired_file
        if signature is not None and path is not None:
            data = read_settings_file(Path(path))
            if not data:
                raise ConfigError(f"the desired file {path} is empty")
            from_file, file_policies = capture_from(data, f"in {path}")
            settings = from_file or settings
            if "models" in data:  # the file's list replaces the settings' models, their policies with them
                policies = file_policies
        return settings, policies
