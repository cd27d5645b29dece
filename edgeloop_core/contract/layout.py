"""Where artifacts live in the bucket (see DESIGN.md, "The artifact contract")::

    <prefix>/models/<name>/<version>/manifest.json       written last: its presence means "complete"
    <prefix>/models/<name>/<version>/<file>              variants, validation.npz, report.html
    <prefix>/models/<name>/<version>/engines/<target>/<variant>.plan   (+ <variant>.json, a shared engine's record)
    <prefix>/models/<name>/channels/<channel>.json       {"version": ...}, moved after a version is complete
"""

from __future__ import annotations

from dataclasses import dataclass

MANIFEST_FILE = "manifest.json"
ENGINE_FILE = "engine.plan"


@dataclass(frozen=True)
class ArtifactLayout:
    """Builds S3 keys under an optional ``prefix`` (no leading or trailing slash needed)."""

    prefix: str = ""

    def _root(self) -> str:
        cleaned = self.prefix.strip("/")
        return f"{cleaned}/models" if cleaned else "models"

    def model_prefix(self, name: str) -> str:
        """Key prefix of every version and channel of model ``name`` (ends with ``/``)."""
        return f"{self._root()}/{name}/"

    def version_prefix(self, name: str, version: str) -> str:
        """Key prefix of one version's files (ends with ``/``)."""
        return f"{self._root()}/{name}/{version}/"

    def file_key(self, name: str, version: str, file: str) -> str:
        """Key of a file that belongs to a version (``file`` is relative, as recorded in the manifest)."""
        return self.version_prefix(name, version) + file

    def manifest_key(self, name: str, version: str) -> str:
        """Key of a version's manifest."""
        return self.file_key(name, version, MANIFEST_FILE)

    def engine_key(self, name: str, version: str, target_key: str, file: str = ENGINE_FILE) -> str:
        """Key of an engine built for ``target_key`` (a TensorRT plan by default)."""
        return self.file_key(name, version, f"engines/{target_key}/{file}")

    def channel_key(self, name: str, channel: str) -> str:
        """Key of a channel pointer such as ``stable`` or ``canary``."""
        return f"{self._root()}/{name}/channels/{channel}.json"
