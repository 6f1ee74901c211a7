"""Session stores: `open_store(url)` picks memory://, sqlite:/// or redis:// (see base.py)."""

from server.stores.base import (
    Page,
    SessionMeta,
    SessionRecord,
    StateStore,
    StoreFull,
    StoreUnavailable,
    open_store,
)

__all__ = ["Page", "SessionMeta", "SessionRecord", "StateStore", "StoreFull", "StoreUnavailable", "open_store"]
