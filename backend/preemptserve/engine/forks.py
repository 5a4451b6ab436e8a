"""Sequences of one prompt (``num_return_sequences``) waiting to share its prefill.

The first sequence runs as an ordinary request; the others are added with ``fork_of`` it
and wait here, outside the scheduler, until the step that computes the first sequence's
last prompt token. Then each gets the prompt's KV blocks from it (``BlockManager.fork``:
the full ones shared, the last partial one copied) with every prompt token but the last
computed, and enters the scheduler as a started request (as a request moved from another
engine does): its first step feeds the last prompt token into its own block and samples
its own first token. A sequence whose first one left before that (cancelled), or whose
fork finds no free block, starts on its own instead, as any request.
"""

from __future__ import annotations

from ..core.request import Request


class PendingForks:
    """Sequences waiting for their first sequence's prefill, by that sequence's id."""

    def __init__(self) -> None:
        self._by_parent: dict[str, list[Request]] = {}
        self._parent_of: dict[str, str] = {}

    def __bool__(self) -> bool:
        return bool(self._by_parent)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._parent_of

    def add(self, parent_id: str, child: Request) -> None:
        self._by_parent.setdefault(parent_id, []).append(child)
        self._parent_of[child.request_id] = parent_id

    def pop_children(self, parent_id: str) -> list[Request]:
        """The sequences waiting for ``parent_id`` (none waits any more)."""
        children = self._by_parent.pop(parent_id, [])
        for child in children:
            del self._parent_of[child.request_id]
        return children

    def discard(self, request_id: str) -> Request | None:
        """Take a waiting sequence out (cancelled); None if it is not waiting."""
        parent_id = self._parent_of.pop(request_id, None)
        if parent_id is None:
            return None
        children = self._by_parent[parent_id]
        child = next(c for c in children if c.request_id == request_id)
        children.remove(child)
        if not children:
            del self._by_parent[parent_id]
        return child
