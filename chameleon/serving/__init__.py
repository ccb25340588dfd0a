"""The Ray Serve endpoint: published group edits behind an OpenAI-compatible API.

`chameleon.serving:app_builder` is the import path the Serve configs use; it (and `build_app`)
load lazily so importing this package needs neither Ray nor FastAPI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app_builder", "build_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from chameleon.serving import app

        return getattr(app, name)
    raise AttributeError(f"module 'chameleon.serving' has no attribute {name!r}")
