"""Who may use the server: an API key (Bearer token) and the browsers' cross-origin rules (CORS).

With a key, every request needs ``Authorization: Bearer <key>`` or gets OpenAI's 401 JSON;
``/health`` and ``/metrics`` stay open unless ``protect_probes`` (load balancers and Prometheus
rarely carry tokens).  CORS is off unless origins are given: a server on a workstation with
``Access-Control-Allow-Origin: *`` would let any web page the user visits use it.  (vLLM allows
every origin by default; pass ``--allowed-origins '["*"]'`` for that.)
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from .openai_protocol import ErrorInfo, ErrorResponse

PROBES = frozenset({"/health", "/metrics"})


@dataclass(frozen=True)
class ServerAccess:
    """The access rules of one server (``pagedattn serve`` flags, vLLM's names)."""

    api_key: str | None = None  # None: no key needed
    protect_probes: bool = False  # with a key: /health and /metrics need it too
    allowed_origins: tuple[str, ...] = ()  # CORS: none (off), or origins such as "https://app.example", or "*"
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key: empty; leave it out for a server without a key")

    def needs_key(self, path: str) -> bool:
        return self.api_key is not None and (self.protect_probes or path not in PROBES)


class ApiKeyAuth:
    """401 (OpenAI's JSON, ``code: invalid_api_key``) for a request without the right Bearer token.
    The comparison takes the same time whatever the token, so timing tells nothing of the key."""

    def __init__(self, app: ASGIApp, access: ServerAccess, on_refusal: Callable[[], None]) -> None:
        self.app, self.access, self.on_refusal = app, access, on_refusal
        self.expected = b"Bearer " + (access.api_key or "").encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.access.needs_key(scope["path"]):
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), b"")
        if secrets.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        self.on_refusal()
        await _unauthorized()(scope, receive, send)


def _unauthorized() -> JSONResponse:
    err = ErrorInfo(message="Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                    type="invalid_request_error", code="invalid_api_key")
    return JSONResponse(ErrorResponse(error=err).model_dump(), status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})


def install_access(app: FastAPI, access: ServerAccess, on_refusal: Callable[[], None]) -> None:
    """Add the key check and CORS to ``app`` (after its other middleware: these two run first).
    CORS is the outermost: a browser's preflight carries no key and must still be answered, and
    a 401 needs the CORS headers for the page to read it."""
    if access.api_key is not None:
        app.add_middleware(ApiKeyAuth, access=access, on_refusal=on_refusal)
    if access.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(access.allowed_origins),
                           allow_methods=list(access.allowed_methods), allow_headers=list(access.allowed_headers),
                           allow_credentials=access.allow_credentials)


def parse_list(text: str) -> tuple[str, ...]:
    """A flag's list: vLLM's JSON list (``'["https://a", "https://b"]'``) or comma-separated words."""
    text = text.strip()
    if text.startswith("["):
        items = json.loads(text)
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"not a JSON list of strings: {text}")
        return tuple(items)
    return tuple(i.strip() for i in text.split(",") if i.strip())
