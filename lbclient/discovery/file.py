"""Backends from a file, read again whenever it changes.

Two formats. Lines, one backend each, ``host:port`` and an optional weight; ``#`` starts a
comment, blank lines are skipped::

    # users, pool A
    10.0.3.7:8080 3
    10.0.3.8:8080
    [2001:db8::7]:8080 2

Or JSON: a list (or ``{"backends": [...]}``) whose entries are ``"host:port"`` strings or objects
with ``address`` and optionally ``weight``, ``priority`` and ``metadata``::

    {"backends": [{"address": "10.0.3.7:8080", "weight": 3, "metadata": {"zone": "a"}},
                  {"address": "10.0.9.1:8080", "priority": 1}, "10.0.3.8:8080"]}

A file named ``*.json`` is read as JSON; so is one whose text is JSON (``[1, 2]``, say: it
is no list of lines, whose addresses carry ports), or starts like it (``{``, or ``[`` followed
by ``{``, ``"`` or ``]``); anything else as lines (``[::1]:80`` is a line). A mistake is a
ValueError naming the file and the line (or the entry); the refresh then keeps the last good
set.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from lbclient.backend import MAX_WEIGHT, Backend, shown
from lbclient.discovery.base import Discovered, ServiceDiscovery

__all__ = ["File", "parse_entry", "parse_json", "parse_lines"]

_JSON_START = re.compile(r'\s*(?:\{|\[\s*[\]{"])')
_ENTRY_KEYS = frozenset({"address", "weight", "priority", "metadata"})


def parse_lines(text: str, where: str = "<text>") -> tuple[Backend, ...]:
    """The backends of ``host:port [weight]`` lines; ValueError naming ``where`` and the line."""
    first_line: dict[str, tuple[int, int]] = {}
    backends: list[Backend] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2:
            raise ValueError(
                f"{where}, line {number}: expected 'host:port [weight]', got {shown(line)}"
            )
        weight = 1
        if len(parts) == 2:
            if not parts[1].isdigit() or not parts[1].isascii():
                raise ValueError(
                    f"{where}, line {number}: the weight must be a whole number, "
                    f"got {shown(parts[1])}"
                )
            if len(parts[1].lstrip("0")) > len(str(MAX_WEIGHT)):  # before int()'s digit limit
                raise ValueError(
                    f"{where}, line {number}: the weight must be in 1..{MAX_WEIGHT}, "
                    f"got {shown(parts[1])}"
                )
            weight = int(parts[1])
        try:
            backend = Backend(parts[0], weight)
        except ValueError as exc:
            raise ValueError(f"{where}, line {number}: {exc}") from None
        seen = first_line.get(backend.address)
        if seen is not None:
            if seen[1] != weight:
                raise ValueError(
                    f"{where}, line {number}: {backend.address} is listed again with weight "
                    f"{weight} (line {seen[0]} gives it weight {seen[1]})"
                )
            continue
        first_line[backend.address] = (number, weight)
        backends.append(backend)
    return tuple(backends)


def parse_json(text: str, where: str = "<text>") -> tuple[Backend, ...]:
    """The backends of a JSON list (or ``{"backends": [...]}``); ValueError naming ``where`` and
    the entry."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{where}, line {exc.lineno} column {exc.colno}: not valid JSON: {exc.msg}"
        ) from None
    except ValueError as exc:  # a number beyond int()'s digit limit, say
        raise ValueError(f"{where}: not valid JSON: {exc}") from None
    if isinstance(data, dict):
        if set(data) != {"backends"}:
            raise ValueError(
                f"{where}: a JSON object must hold only 'backends', got {sorted(data)}"
            )
        data = data["backends"]
    if not isinstance(data, list):
        raise ValueError(f"{where}: expected a JSON list of backends, got {type(data).__name__}")
    backends: list[Backend] = []
    seen: dict[str, tuple[int, int]] = {}
    for index, entry in enumerate(data):
        at = f"{where}, backends[{index}]"
        backend = parse_entry(entry, at)
        first = seen.get(backend.address)
        if first is not None:
            if first[1] != backend.weight:
                raise ValueError(
                    f"{at}: {backend.address} is listed again with weight {backend.weight} "
                    f"(backends[{first[0]}] gives it weight {first[1]})"
                )
            continue
        seen[backend.address] = (index, backend.weight)
        backends.append(backend)
    return tuple(backends)


def parse_entry(entry: Any, at: str) -> Backend:
    """One JSON entry (``"host:port"``, or an object with ``address`` and optionally
    ``weight``, ``priority`` and ``metadata``) as a backend; ValueError naming ``at``."""
    if isinstance(entry, str):
        fields: dict[str, Any] = {"address": entry}
    elif isinstance(entry, dict):
        fields = entry
    else:
        raise ValueError(f"{at}: expected 'host:port' or an object, got {shown(entry)}")
    unknown = set(fields) - _ENTRY_KEYS
    if unknown:
        raise ValueError(
            f"{at}: unknown key {sorted(unknown)[0]!r} (the keys are address, weight, "
            "priority, metadata)"
        )
    address = fields.get("address")
    if not isinstance(address, str):
        raise ValueError(f"{at}: 'address' must be a 'host:port' string, got {shown(address)}")
    weight = fields.get("weight", 1)
    metadata = fields.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{at}: 'metadata' must be an object, got {shown(metadata)}")
    if "priority" in fields:
        priority = fields["priority"]
        if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
            raise ValueError(f"{at}: 'priority' must be a whole number >= 0, got {shown(priority)}")
        metadata = {**metadata, "priority": priority}
    try:
        return Backend(address, weight, metadata)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{at}: {exc}") from None


def _is_json(text: str) -> bool:
    """Whether ``text`` is a JSON list or object (no file of lines is: its first address
    would be followed by a port after the closing bracket)."""
    if not text.lstrip().startswith(("[", "{")):
        return False
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class File(ServiceDiscovery):
    """Backends from the file at ``path`` (see the module's text for the two formats), read
    again when it changes: its size, modification time or inode (a file replaced by a rename).

    The file is looked at every ``refresh`` seconds (1.0 unless ``LoadBalancer(refresh=...)``
    says otherwise). A missing or unreadable file, or a mistake in it, fails the lookup: the
    last good set stays. Options as for :class:`ServiceDiscovery`.
    """

    refresh = 1.0

    def __init__(self, path: str | os.PathLike[str], **options: Any) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or a path, got {shown(path)}")
        super().__init__(**options)
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._found: Discovered | None = None

    def discover(self) -> Discovered:
        info = os.stat(self.path)
        stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
        with self._lock:
            if stamp == self._seen and self._found is not None:
                return self._found
        # Read after the stat: a change made meanwhile shows in the next stat.
        text = self.path.read_text(encoding="utf-8")
        found = Discovered(self.parse(text))
        with self._lock:
            self._seen, self._found = stamp, found
        return found

    async def adiscover(self) -> Discovered:
        return self.discover()  # a stat, and a read only after a change

    def parse(self, text: str) -> tuple[Backend, ...]:
        """The backends in ``text``, read as this file's format."""
        where = str(self.path)
        if self.path.suffix.lower() == ".json" or _JSON_START.match(text) or _is_json(text):
            return parse_json(text, where)
        return parse_lines(text, where)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_lock=None, _seen=None, _found=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"File({str(self.path)!r})"
