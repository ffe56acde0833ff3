"""Who may call what: one policy for every front (gRPC metadata, HTTP headers), bearer tokens compared in
constant time.

Three levels, as vLLM's `--api-key` plus Quiver's admin token:
- OPEN: health, reflection, metrics.
- INFERENCE: generation, model info, listing and reading adapters. Needs the API key when one is set; the admin
  token is accepted too (whoever may change adapters may use them).
- ADMIN: registering, importing and deleting adapters. Needs the admin token when one is set, else the API key
  when that is set; with neither, it is open (and the server warns at start-up).
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass

from quiver.common.errors import Unauthenticated

BEARER = "Bearer "


class Access(enum.Enum):
    OPEN = "open"
    INFERENCE = "inference"
    ADMIN = "admin"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (the scheme in any case, RFC 7235); None when absent
    or of another scheme."""
    if authorization is None or authorization[: len(BEARER)].lower() != BEARER.lower():
        return None
    return authorization[len(BEARER):]


@dataclass(frozen=True)
class AccessPolicy:
    """The server's secrets; `check` is the one place a request's credentials are judged."""

    api_key: str | None = None
    admin_token: str | None = None

    def check(self, access: Access, token: str | None) -> None:
        """Raise Unauthenticated unless a request bearing `token` (None: no credentials) may use `access`."""
        accepted, what = self._accepted(access)
        if not accepted:
            return
        if token is None:
            raise Unauthenticated(f"missing {what}")
        if not any(hmac.compare_digest(token.encode(), secret.encode()) for secret in accepted):
            raise Unauthenticated(f"wrong {what}")

    def _accepted(self, access: Access) -> tuple[tuple[str, ...], str]:
        if access is Access.INFERENCE and self.api_key is not None:
            return (self.api_key, *([self.admin_token] if self.admin_token is not None else [])), "API key"
        if access is Access.ADMIN and self.admin_token is not None:
            return (self.admin_token,), "admin token"
        if access is Access.ADMIN and self.api_key is not None:
            return (self.api_key,), "API key"
        return (), ""
