"""What both benchmarks share: their prompts, a resumable checkpoint, and ratios that tolerate gaps."""

from __future__ import annotations

import json
from pathlib import Path


class Checkpoint:
    """Append-only JSONL of finished results (offline: one per prompt and configuration; serving:
    one per row), with a settings header.

    Resuming with different settings (models, max_tokens, seeds...) would mix incomparable
    numbers, so a mismatching header is an error.
    """

    def __init__(self, path: Path, settings: dict, fresh: bool = False) -> None:
        self.path = path
        self.records: dict[str, dict] = {}
        if fresh and path.exists():
            path.unlink()
        if path.exists():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            header = lines[0].get("settings") if lines else None
            if header != settings:
                raise ValueError(
                    f"{path} was written with other settings ({header}); use --fresh or another --output"
                )
            for record in lines[1:]:
                self.records[record["key"]] = record
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"settings": settings}) + "\n")

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, record: dict) -> None:
        self.records[record["key"]] = record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None where either is missing or the divisor is 0."""
    if num is None or den is None or den == 0:
        return None
    return num / den
