"""API token routes: create (the token is in this one response only), list, revoke.

``POST /api/v1/auth/tokens`` ``{"name"}`` → 201 with ``token``;
``GET /api/v1/auth/tokens``; ``DELETE /api/v1/auth/tokens/{name}`` → 204.
Who may call them is decided before any route runs (:mod:`hvstack.api.guard`): a token
on TCP, the peer check on the unix socket.
"""

from __future__ import annotations

import datetime

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from hvstack.host.auth import TokenInfo, TokenStore

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64,
                      description="letters, digits, '.', '_' or '-'")


class TokenView(BaseModel):
    id: str
    name: str
    created_at: datetime.datetime


class NewTokenView(TokenView):
    token: str = Field(description="the bearer token; shown only in this response")


def tokens_of(request: Request) -> TokenStore:
    tokens: TokenStore = request.app.state.tokens
    return tokens


def _view(info: TokenInfo) -> TokenView:
    return TokenView(id=info.id, name=info.name,
                     created_at=datetime.datetime.fromtimestamp(info.created_at, datetime.UTC))


@router.post("/tokens", status_code=201, response_model=NewTokenView)
async def create_token(body: TokenCreate, request: Request) -> NewTokenView:
    new = tokens_of(request).create(body.name)
    return NewTokenView(**_view(new.info).model_dump(), token=new.token)


@router.get("/tokens", response_model=list[TokenView])
async def list_tokens(request: Request) -> list[TokenView]:
    return [_view(info) for info in tokens_of(request).list()]


@router.delete("/tokens/{name}", status_code=204, response_class=Response)
async def revoke_token(name: str, request: Request) -> Response:
    tokens_of(request).revoke(name)
    return Response(status_code=204)
