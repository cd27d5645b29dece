"""Desired state: what should serve now, and nothing else.

Precedence, highest first: a version (or channel) pinned through ``RepositoryModelLoad`` (repository control), the
desired file (``EDGE_DESIRED_FILE``: the Helm ConfigMap volume, re-read every cycle and watched for edits), the
settings (``EDGE_MODEL_NAME``/``EDGE_MODEL_VERSION``). Every name and version passes the one name pattern.
"""

from __future__ import annotations

from pathlib import Path

from edge_runtime.contract import check_name
from edge_runtime.settings import EdgeSettings, read_settings_file


class DesiredState:
    """Answers "which model, at which version or channel?" from the sources above."""

    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self.pinned: str | None = None
        """A version or channel pinned by ``RepositoryModelLoad``; above the desired file until cleared."""
        self.current: tuple[str, str] = (settings.model_name, settings.model_version)
        """What :meth:`read` answered last."""
        self._seen: int | None = None

    def file_mtime(self) -> int | None:
        """The desired file's modification time (``None``: no file, or it is being replaced right now)."""
        path = self.settings.desired_file
        try:
            return Path(path).stat().st_mtime_ns if path else None
        except OSError:
            return None

    def changed(self) -> bool:
        """Whether the desired file changed since :meth:`read` (or :meth:`mark_seen`) looked at it."""
        return self.file_mtime() != self._seen

    def mark_seen(self) -> None:
        """Remember the file's current time without reading it (an unloaded model ignores edits)."""
        self._seen = self.file_mtime()

    def read(self) -> tuple[str, str]:
        """``(model name, version or channel)`` by the precedence in the module docstring."""
        self._seen = self.file_mtime()  # before reading: a later edit is noticed as a change
        name, version = self.settings.model_name, self.settings.model_version
        if self.pinned is not None:
            name, version = self.current[0], self.pinned
        elif self.settings.desired_file is not None and Path(self.settings.desired_file).exists():
            data = read_settings_file(Path(self.settings.desired_file))
            where = f"in {self.settings.desired_file}"
            name = check_name(data.get("model_name", name), f"model_name {where}")
            version = check_name(data.get("model_version", version), f"model_version {where}")
        self.current = (name, version)
        return self.current

    def pin(self, name: str, version: str | None) -> None:
        """Pin ``version`` (a version or channel) for ``name``; ``None`` clears the pin."""
        check_name(name, "model name")
        self.pinned = check_name(version, "version") if version else None
