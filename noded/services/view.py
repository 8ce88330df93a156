"""What a backend reports as programmed, read back from the kernel (`noded services`)."""

from __future__ import annotations

from dataclasses import dataclass

from noded.model.tracker import Backend, Frontend


@dataclass
class ProgrammedView:
    frontend: Frontend
    svc_id: int
    affinity_timeout: int
    ready: list[Backend]
    terminating: list[Backend]
