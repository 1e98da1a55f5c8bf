"""The API's typed requests and views of checkpoints (pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from hvstack.api.schemas import Request


class CheckpointCreate(Request):
    name: str | None = Field(None, description="default: Hyper-V's 'VM - (date - time)'")


class CheckpointApply(Request):
    save_current: bool = Field(False, description="checkpoint the current state first")


class CheckpointRename(Request):
    name: str


class CheckpointView(BaseModel):
    id: str
    name: str
    parent: str | None
    created_at: float
    kind: Literal["production", "standard"]
    automatic: bool
    disks: dict[str, str] = Field(description="disk id -> the checkpoint's frozen file")
    memory_state: bool = Field(description="it holds the memory and device state")
    current: bool = Field(description="the VM's current state ('Now') follows it")


class CheckpointList(BaseModel):
    vm: str
    vm_id: str
    current: str | None = Field(description="the checkpoint 'Now' follows, if any")
    checkpoint_type: str
    checkpoint_limit: int
    checkpoints: list[CheckpointView] = Field(description="oldest first")
