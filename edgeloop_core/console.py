"""The one rich console every ``edgeloop`` command prints to."""

from __future__ import annotations

from rich.console import Console

console = Console()
if not console.is_terminal:  # logs and CI: wide enough for our tables
    console = Console(width=140)
