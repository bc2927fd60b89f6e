"""BENCHMARKS.md: each benchmark owns one `## ` section, which it rewrites as it measures."""

from __future__ import annotations

from pathlib import Path

HEADER = "# Benchmarks\n\nEach section is written by its script in bench/.\n\n"


def update_section(path: str | Path, heading: str, text: str) -> None:
    """Replace the section that starts with `heading` by `text` (or append it); the others stay."""
    path = Path(path)
    content = path.read_text() if path.exists() else HEADER
    start = content.find(heading)
    if start >= 0:
        end = content.find("\n## ", start + 1)
        content = content[:start] + text + (content[end + 1:] if end >= 0 else "")
    else:
        content = content.rstrip("\n") + "\n\n" + text
    path.write_text(content)
