"""Where a benchmark's numbers go: ``bench.json`` (meta and rows) and ``bench.md`` under ``--out``, and stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["save_rows"]


def save_rows(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]], markdown: str) -> None:
    """Write ``{"meta": meta, "rows": rows}`` to ``out/bench.json`` and ``markdown`` to ``out/bench.md`` (``out``
    made if missing), then print the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "bench.md").write_text(markdown, encoding="utf-8")
    print(markdown)
