"""Heads shipped inside the package, one directory per draft model."""

from __future__ import annotations

import json
from pathlib import Path

SHIPPED_DIR = Path(__file__).parent


def shipped_head_for(draft_identity: str) -> Path | None:
    """The shipped head trained for `draft_identity`, if there is one."""
    for config in sorted(SHIPPED_DIR.glob("*/config.json")):
        if json.loads(config.read_text()).get("draft_id") == draft_identity:
            return config.parent
    return None
