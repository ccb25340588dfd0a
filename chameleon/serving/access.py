"""Who may call the endpoint and what a caller may learn from it (no Ray, no web framework).

- `api_key(cfg)`: the bearer token the ingress checks. Fail closed: a configured but unset or
  empty key variable is an error (`AuthConfigError`) unless `allow_unauthenticated` is set, so a
  missing Kubernetes Secret or a typo in a variable name never silently opens the endpoint.
- `public_personalization(pers, detail)`: the personalization a response carries. By default
  (`minimal`) only what the caller already knows: whether a `user` id is in the data, and which
  group it is in, is not told to every key holder.
- `PUBLIC_STATUS`: the one field unauthenticated `/healthz` returns; the details (run ids, store
  errors, counts, fingerprints) are behind the key on the status endpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from chameleon.serving.config import ServeConfig
from chameleon.serving.protocol import PersonalizationDetail

PUBLIC_STATUS = ("status",)
"""Fields of the replica's health that unauthenticated `/healthz` may return."""


class AuthConfigError(ValueError):
    """Auth is configured but no key is available, and unauthenticated serving was not allowed."""


def api_key(cfg: ServeConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token requests must send; None only when `allow_unauthenticated` is set and no
    key is configured. Raises `AuthConfigError` otherwise (the server must not start)."""
    env = os.environ if environ is None else environ
    key = (env.get(cfg.api_key_env) or "").strip() if cfg.api_key_env else ""
    if key:
        return key
    if cfg.allow_unauthenticated:
        return None
    where = f"${cfg.api_key_env} is unset or empty" if cfg.api_key_env else "api_key_env is null"
    raise AuthConfigError(
        f"refusing to serve without authentication: {where}. Set the variable to a secret "
        "(e.g. `export CHAMELEON_API_KEY=$(openssl rand -hex 24)`), or start with "
        "--allow-unauthenticated (allow_unauthenticated: true) to serve without a key on purpose"
    )


def public_personalization(pers: PersonalizationDetail, detail: str) -> PersonalizationDetail:
    """The personalization a response may show. `full`: as resolved. `minimal`: the run id, and
    the group only when the request named it; requests that gave a `user` all read `source:
    "user"` with no group, whether the user was found or got the fallback."""
    if detail == "full":
        return pers
    source = pers.source
    return PersonalizationDetail(
        run_id=pers.run_id,
        group_id=pers.group_id if source == "group" else None,
        source=source if source in ("group", "off") or pers.user is None else "user",
        user=pers.user,
    )
