"""The one grammar for user, group and run ids.

Ids become key segments in the store (`runs/<run_id>/groups/<group_id>.safetensors`) and travel
in requests, so the job, the artifacts and serving must agree on exactly one rule: 1-128
characters from letters, digits and `_ . : @ -`, starting with a letter or digit. No id can be
empty, start with a dot (hidden or relative path segments), or carry a slash or a control
character.

Group files live alone under `groups/`, so no group id can collide with another run file.
"""

from __future__ import annotations

import re

ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}"
_ID_RE = re.compile(ID_PATTERN)
ID_RULE = "1-128 letters, digits, '_', '.', ':', '@' or '-', starting with a letter or digit"


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def validate_id(value: object, what: str = "id") -> str:
    """Return `value` when it follows the id grammar; raise ValueError naming `what` otherwise."""
    if not is_valid_id(value):
        raise ValueError(f"invalid {what} {value!r}: use {ID_RULE}")
    return value  # type: ignore[return-value]
