"""Who is calling: turns a call's metadata (gRPC's, or a local-socket frame's) into a Caller.

Tokens map to tenants through a TOML tokens file; the tenant always comes from the
token, never from what the caller claims. Only with insecure_no_auth (an explicit
flag) is a request without a token accepted, as the tenant named in metadata (or
"default") with the admin role, which suits a single-user local server.

Nodes of a cluster call each other with a peer-role token (peer_tokens_file's [[peers]] entries,
or a tokens_file entry with `peer = true`). A peer acts for every tenant, so its token is as
sensitive as an admin's; it opens PeerService only (require_peer), and no tenant token, admin
or not, opens PeerService.

Names are checked here, where they enter: a tenant name is stored in every SSD record's
header (a 16-bit length) and a client id in every lease, so an unbounded one from the
local socket (whose metadata has no gRPC size cap) once broke durable puts and the flush.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from kvwire.defaults import AUTH_METADATA, CLIENT_ID_METADATA, MAX_NAME_BYTES, TENANT_METADATA
from kvwire.errors import InvalidRequestError, PermissionDeniedError, UnauthenticatedError
from kvstore.store import Caller

MAX_TENANT_BYTES = MAX_NAME_BYTES
MAX_CLIENT_ID_BYTES = MAX_NAME_BYTES
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_name(what: str, name: str, max_bytes: int, allow_empty: bool = False) -> str:
    """name if it is 1..max_bytes of UTF-8 without control characters; the error never repeats it."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise InvalidRequestError(f"{what} is not valid UTF-8") from None
    if size > max_bytes:
        raise InvalidRequestError(f"{what} is {size} bytes; the limit is {max_bytes} bytes of UTF-8")
    if size == 0 and not allow_empty:
        raise InvalidRequestError(f"{what} is empty; it must be 1 to {max_bytes} bytes of UTF-8")
    if bad := _CONTROL_CHARACTER.search(name):
        raise InvalidRequestError(f"{what} contains a control character (U+{ord(bad.group()):04X}); none are allowed")
    return name


def check_tenant(name: str) -> str:
    return check_name("tenant name", name, MAX_TENANT_BYTES)


@dataclass(frozen=True)
class TokenEntry:
    tenant: str
    admin: bool = False
    peer: bool = False  # a cluster node's credential: PeerService only, no tenant API


MAX_REMEMBERED_CALLERS = 4096  # distinct (metadata, peer) answers kept; all forgotten at once when full


class Authenticator:
    def __init__(self, insecure: bool, tokens: dict[str, TokenEntry] | None = None) -> None:
        self.insecure = insecure
        self.tokens = tokens or {}
        # caller()'s answers by its arguments: they are all it reads besides the tokens, which never change after start.
        # A client sends the same metadata on every call, and checking it again cost ~8 us of a 512-key local Pin.
        self._callers: dict[tuple, Caller] = {}

    @classmethod
    def from_file(cls, insecure: bool, tokens_file: str, peer_tokens_file: str = "") -> "Authenticator":
        """Raises ValueError (the server refuses to start) for an entry without a token or with a bad tenant name."""
        tokens: dict[str, TokenEntry] = {}
        if tokens_file:
            doc = tomllib.loads(Path(tokens_file).read_text())
            for i, entry in enumerate(doc.get("tokens", []), 1):
                where = f"{tokens_file}: [[tokens]] entry #{i}"
                if entry.get("peer"):
                    tokens[cls._peer_token(entry, where)] = TokenEntry("", peer=True)
                    continue
                if not entry.get("token") or "tenant" not in entry:
                    raise ValueError(f"{where} needs a non-empty token and a tenant")
                try:
                    tenant = check_tenant(str(entry["tenant"]))
                except InvalidRequestError as err:
                    raise ValueError(f"{where}: {err}") from None
                tokens[str(entry["token"])] = TokenEntry(tenant, bool(entry.get("admin", False)))
        if peer_tokens_file:
            doc = tomllib.loads(Path(peer_tokens_file).read_text())
            for i, entry in enumerate(doc.get("peers", []), 1):
                token = cls._peer_token(entry, f"{peer_tokens_file}: [[peers]] entry #{i}")
                if token in tokens and not tokens[token].peer:
                    raise ValueError(f"{peer_tokens_file}: [[peers]] entry #{i} reuses a tenant's token; a peer token must be its own")
                tokens[token] = TokenEntry("", peer=True)
        if not insecure and not any(not e.peer for e in tokens.values()):
            raise ValueError("no tokens configured, so every request would be refused: set tokens_file, or pass --insecure-no-auth for a local single-user server")
        return cls(insecure, tokens)

    @staticmethod
    def _peer_token(entry: dict, where: str) -> str:
        if not entry.get("token") or entry.get("tenant") or entry.get("admin"):
            raise ValueError(f"{where}: a peer entry needs a non-empty token and no tenant or admin role")
        return str(entry["token"])

    @property
    def peer_token(self) -> str:
        """The token this node presents to its peers ("" without one: only a peer without auth accepts that)."""
        return next((token for token, entry in self.tokens.items() if entry.peer), "")

    def require_peer(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        """A PeerService call must bear a peer token (or, without auth, none at all)."""
        md = {k: v for k, v in metadata}
        token = str(md.get(AUTH_METADATA, "")).removeprefix("Bearer ").strip()
        entry = self.tokens.get(token) if token else None
        if token and entry is None:
            raise UnauthenticatedError("the bearer token is not valid for this server")
        if entry is None:
            if self.insecure:
                return
            raise UnauthenticatedError("peer calls need a peer token in 'authorization' metadata")
        if not entry.peer:
            raise PermissionDeniedError("only a cluster node's peer token may call the peer service")

    def caller(self, metadata: Iterable[tuple[str, str | bytes]], peer: str = "") -> Caller:
        """peer (the transport's name for the connection) names a client that sends no client id, so two
        such clients never share leases and pins; each connection is then its own owner. Only answers are
        remembered (a refusal is worked out again each time), keyed by everything that decided them."""
        metadata = tuple(metadata)
        remembered = (metadata, peer)
        try:
            caller = self._callers.get(remembered)
        except TypeError:  # a value that does not hash: worked out afresh
            return self._caller(metadata, peer)
        if caller is None:
            caller = self._caller(metadata, peer)
            if len(self._callers) >= MAX_REMEMBERED_CALLERS:
                self._callers.clear()
            self._callers[remembered] = caller
        return caller

    def _caller(self, metadata: Iterable[tuple[str, str | bytes]], peer: str) -> Caller:
        md = {k: v for k, v in metadata}
        token = str(md.get(AUTH_METADATA, "")).removeprefix("Bearer ").strip()
        entry = self.tokens.get(token) if token else None
        if token and entry is None:
            raise UnauthenticatedError("the bearer token is not valid for this server")
        if entry is None and not self.insecure:
            raise UnauthenticatedError("missing bearer token in 'authorization' metadata")
        if entry is not None and entry.peer:
            raise PermissionDeniedError("a cluster node's peer token opens no tenant or admin API")
        client_id = check_name("client id", str(md.get(CLIENT_ID_METADATA) or f"anonymous@{peer}"[:MAX_CLIENT_ID_BYTES]), MAX_CLIENT_ID_BYTES, allow_empty=True)
        claimed = str(md.get(TENANT_METADATA) or "")
        if claimed:
            check_tenant(claimed)
        if entry is not None:
            if claimed and claimed != entry.tenant:
                raise PermissionDeniedError(f"the token belongs to tenant {entry.tenant!r}, not {claimed!r}")
            return Caller(tenant=entry.tenant, client_id=client_id, is_admin=entry.admin)
        return Caller(tenant=claimed or "default", client_id=client_id, is_admin=True)

    @staticmethod
    def require_admin(caller: Caller) -> None:
        if not caller.is_admin:
            raise PermissionDeniedError(f"tenant {caller.tenant!r} is not an admin")
