"""Who is calling: turns gRPC metadata into a Caller.

Tokens map to tenants through a TOML tokens file; the tenant always comes from the
token, never from what the caller claims. Only with insecure_no_auth (an explicit
flag) is a request without a token accepted, as the tenant named in metadata (or
"default") with the admin role, which suits a single-user local server.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from kvclient.errors import PermissionDeniedError, UnauthenticatedError
from kvstore.store import Caller

TENANT_METADATA = "kvstore-tenant"
CLIENT_ID_METADATA = "kvstore-client-id"
AUTH_METADATA = "authorization"


@dataclass(frozen=True)
class TokenEntry:
    tenant: str
    admin: bool = False


class Authenticator:
    def __init__(self, insecure: bool, tokens: dict[str, TokenEntry] | None = None) -> None:
        self.insecure = insecure
        self.tokens = tokens or {}

    @classmethod
    def from_file(cls, insecure: bool, tokens_file: str) -> "Authenticator":
        tokens: dict[str, TokenEntry] = {}
        if tokens_file:
            doc = tomllib.loads(Path(tokens_file).read_text())
            for entry in doc.get("tokens", []):
                tokens[str(entry["token"])] = TokenEntry(str(entry["tenant"]), bool(entry.get("admin", False)))
        if not insecure and not tokens:
            raise ValueError("no tokens configured, so every request would be refused: set tokens_file, or pass --insecure-no-auth for a local single-user server")
        return cls(insecure, tokens)

    def caller(self, metadata: Iterable[tuple[str, str | bytes]]) -> Caller:
        md = {k: v for k, v in metadata}
        client_id = str(md.get(CLIENT_ID_METADATA, "anonymous"))
        token = str(md.get(AUTH_METADATA, ""))
        token = token.removeprefix("Bearer ").strip()
        if token:
            entry = self.tokens.get(token)
            if entry is None:
                raise UnauthenticatedError("the bearer token is not valid for this server")
            claimed = md.get(TENANT_METADATA)
            if claimed and claimed != entry.tenant:
                raise PermissionDeniedError(f"the token belongs to tenant {entry.tenant!r}, not {claimed!r}")
            return Caller(entry.tenant, client_id, entry.admin)
        if not self.insecure:
            raise UnauthenticatedError("missing bearer token in 'authorization' metadata")
        return Caller(str(md.get(TENANT_METADATA) or "default"), client_id, is_admin=True)

    @staticmethod
    def require_admin(caller: Caller) -> None:
        if not caller.is_admin:
            raise PermissionDeniedError(f"tenant {caller.tenant!r} is not an admin")
