"""The global event stream over HTTP (CONTRACT §6). Placeholder until the stream work lands."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from api.methods import Method

EVENT_METHODS: Final[tuple[Method, ...]] = ()
