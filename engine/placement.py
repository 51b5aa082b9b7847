"""Where each model goes: draft + head on one device, target on one device or sharded.

(Minimal CPU/explicit version; the GPU-inventory planner extends `plan_from_config`.)
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import EngineConfig


@dataclass
class Placement:
    draft_device: str
    target_device: str | None  # a single device, or None when sharded with a device map
    target_device_map: dict | str | None = None

    def describe_target(self) -> str:
        return self.target_device or f"device map {self.target_device_map}"


def plan_from_config(config: EngineConfig, target_spec: str, draft_spec: str | None) -> Placement:
    draft_device = config.draft_device or "cpu"
    devices = config.target_devices or [draft_device]
    if len(devices) == 1:
        return Placement(draft_device=draft_device, target_device=devices[0])
    return Placement(draft_device=draft_device, target_device=None, target_device_map="auto")
