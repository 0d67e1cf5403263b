"""Serialized JSON bodies of the heavier reads, reused while the store's version is unchanged.

Rounds are written once and label events only appended, so between two rounds a dashboard polling /progress or
/rounds/{id} asks the same question again and again; checking a version is far cheaper than answering.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable


class VersionedResponseCache:
    def __init__(self, *, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[Hashable, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, version: Hashable) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] != version:
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: Hashable, version: Hashable, body: bytes) -> None:
        with self._lock:
            self._entries[key] = (version, body)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
