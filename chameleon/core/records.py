"""What the method knows of a user: an id, history items, an optional query and group.

`chameleon.data.schema` builds these from raw records (validating them); the core consumes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_QUERY_TEMPLATE = "{text}"


@dataclass(frozen=True)
class HistoryItem:
    text: str
    """What the user wrote (a profile item)."""
    input: str | None = None
    """The query this item answers, if known; pairs are generated for these queries."""


@dataclass(frozen=True)
class UserRecord:
    user_id: str
    history: tuple[HistoryItem, ...]
    query: str | None = None
    group_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def queries(self, template: str = DEFAULT_QUERY_TEMPLATE) -> list[str]:
        """The query of each history item: its `input`, else the template applied to its text."""
        return [h.input if h.input else template.format(text=h.text) for h in self.history]

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "history": [{"text": h.text, "input": h.input} for h in self.history],
            "query": self.query,
            "group_id": self.group_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UserRecord:
        """Rebuild a record from `to_dict()` output: for records that were validated already (a
        driver shipping its accepted users to workers), so the workers never re-validate them
        under other limits."""
        return cls(
            user_id=data["user_id"],
            history=tuple(HistoryItem(text=h["text"], input=h["input"]) for h in data["history"]),
            query=data["query"],
            group_id=data["group_id"],
        )
