"""Hand-built manifest rows for the dedupe, split and arrange tests."""

from __future__ import annotations

import hashlib

import pandas as pd

COLUMNS = (
    "source_path", "relative_path", "label", "source_split", "sha256", "bytes", "mtime_ns",
    "format", "mode", "width", "height", "converted_path", "status", "reason", "split",
    "arranged_path",
)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def row(name: str, label: str = "cat", *, content: str | None = None, source_split: str = "",
        status: str = "ok", reason: str = "", source_path: str = "", converted_path: str = "") -> dict:
    return {
        "source_path": source_path or f"/src/{name}", "relative_path": name, "label": label,
        "source_split": source_split, "sha256": sha(content if content is not None else name),
        "bytes": 10, "mtime_ns": 1, "format": "JPEG", "mode": "RGB", "width": 48, "height": 40,
        "converted_path": converted_path, "status": status, "reason": reason, "split": "",
        "arranged_path": "",
    }


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(COLUMNS))


def by_name(df: pd.DataFrame) -> dict[str, tuple[str, str, str]]:
    return {r.relative_path: (r.status, r.reason, r.split) for r in df.itertuples()}
