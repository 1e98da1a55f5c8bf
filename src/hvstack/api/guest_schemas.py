"""Typed requests and views of the guest operations: exec, copy-file, KVP, fsfreeze.

Requests reject unknown fields, like every request of the API (see
:mod:`hvstack.api.schemas`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from hvstack.api.schemas import JobView, Request

MAX_OUTPUT = 16 * 1024 * 1024  # what qemu-ga keeps of each stream


class ExecRequest(Request):
    command: list[str] = Field(min_length=1, description="program and its arguments")
    input: str | None = Field(None, description="bytes for the program's stdin, base64")
    timeout_seconds: float = Field(300.0, gt=0, le=86400,
                                   description="kill the program after this long")
    max_output_bytes: int = Field(1024 * 1024, ge=0, le=MAX_OUTPUT,
                                  description="keep at most this much of stdout and of "
                                              "stderr each; more sets truncated")


class ExecView(BaseModel):
    exit_code: int | None = Field(description="None when a signal ended the program")
    signal: int | None
    stdout: str
    stderr: str
    encoding: Literal["utf-8", "base64"] = Field(
        description="how stdout and stderr are given: text when both are UTF-8")
    truncated: bool
    stdout_truncated: bool
    stderr_truncated: bool
    pid: int
    duration_seconds: float


class CopyFileRequest(Request):
    direction: Literal["to-guest", "from-guest"]
    guest_path: str = Field(description="absolute path of the file in the guest")
    size: int | None = Field(None, ge=0, description="bytes that will be sent (to-guest)")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                               description="of the bytes that will be sent (to-guest)")
    create_dirs: bool = False
    overwrite: bool = False


class CopyFileStarted(BaseModel):
    transfer_id: str
    data_url: str = Field(description="PUT the bytes here (to-guest) or GET them "
                                      "(from-guest), within the data wait")
    direction: str
    guest_path: str
    size: int
    sha256: str | None = Field(description="from-guest: the guest file's, taken before "
                                           "the copy")
    job: JobView


class KvpSet(Request):
    key: str
    value: str


class KvpChangeView(BaseModel):
    key: str
    value: str | None
    pushed: bool
    push_error: str | None
    host: dict[str, str]


class KvpView(BaseModel):
    host: dict[str, str] = Field(description="host-to-guest pool (the VM's setting)")
    guest: dict[str, str] = Field(description="guest-to-host pool, read from the guest now")
    intrinsic: dict[str, Any] | None = Field(description="what the guest reports about "
                                                         "itself")
    guest_available: bool
    guest_error: str | None
    ignored_guest_lines: int


class FsFreezeRequest(Request):
    action: Literal["freeze", "thaw", "status"]
    hold_seconds: float = Field(60.0, gt=0, le=3600,
                                description="freeze: thaw by itself after this long")


class FsFreezeView(BaseModel):
    status: str
    filesystems: int | None
    holds: int
    auto_thaw_at: float | None
