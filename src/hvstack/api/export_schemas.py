"""Typed requests and views of exports and imports (pydantic; requests reject unknown
fields)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from hvstack.api.schemas import Request


class ExportRequest(Request):
    path: str = Field(description="the folder to export into (inside the storage roots); "
                      "the export is its subfolder named after the VM")


class ImportBody(Request):
    path: str = Field(description="the export's folder (the one holding vm.json, or its "
                      "parent when that holds one export)")
    mode: Literal["copy", "register"] = "copy"
    new_id: bool = False
    name: str | None = None
    dest: str | None = Field(None, description="copy: a folder in the storage roots; the "
                             "files go to DEST/<name> (default: the new VM's folder)")


class ImportCheckView(BaseModel):
    path: str
    ok: bool
    id: str
    name: str
    generation: int
    state: str
    checkpoints: int
    files: int
    problems: list[str]
    notes: list[str]
    destination: str | None
    source: str
