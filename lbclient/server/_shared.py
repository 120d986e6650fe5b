"""Requests in flight counted across the worker processes of one server: every process that
accepts on the same listening address (``gunicorn -w N``, ``uvicorn --workers N``) keeps its own
count in a slot of a small file all of them map, and a report adds the other processes' slots
to its own.

The file is ``lbclient-rif-<uid>-<pid namespace>-<port>`` (or ``...-unix-<hash of the path>``)
in ``/dev/shm`` (else the temporary directory; process ids mean something within one PID
namespace only), 4 KiB: one header slot (a mark, and a generation that each claim and release of
a slot bumps) and :data:`SLOTS` slots of four 64-bit words: the owner's process id, its start
time (from ``/proc``, so that a reused id is told apart), the server's identity (for a port, the
network namespace: a port in another one is another server; for a Unix socket, the socket's
inode: another server that once had the path is not this one) and the owner's requests in
flight. A slot is written by its owner only; slots are claimed and released under an exclusive
``flock`` of the file, and the file is removed when the last live owner releases its slot. A
process that died without releasing (killed) leaves a slot that no reader counts and the next
claim takes over. Slots of the reader's own process (its other trackers) are not added: each
reports its own.

What lives here: finding this process's listening address (Linux ``/proc``), the file and its
slots. What may not: counting (the tracker counts and publishes), HTTP. Where any of it is not
possible (not Linux, no such socket, the file another user's, every slot taken) joining returns
None and the tracker counts its own process alone.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import mmap
import os
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sized
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from lbclient.server._counting import Counter

__all__ = [
    "SLOTS",
    "Shared",
    "discard",
    "find_listener",
    "listening_inode",
    "shared_directory",
    "shared_file",
    "unix_key",
]

logger = logging.getLogger("lbclient.server")

#: Slots of one file (the header's slot aside): the most worker processes counted together.
SLOTS: Final = 127
_WORDS: Final = 4  # per slot: pid, start time, the server's identity, requests in flight
_SIZE: Final = (SLOTS + 1) * _WORDS * 8
_MARK: Final = 0x6C62_7269_6631  # "lbrif1": a file of this layout
_PID, _START, _SERVER, _COUNT = range(_WORDS)
_GENERATION: Final = 1  # the header's word bumped by each claim and release
#: Seconds between two checks that the other slots' owners still run.
CHECK_EVERY: Final = 1.0
#: How often, and how long apart (seconds), the file's lock is tried before giving up.
LOCK_TRIES: Final = 40
LOCK_PAUSE: Final = 0.005
#: The largest count one slot may add (a slot holding more is not believed).
MOST_PER_SLOT: Final = 1 << 20


def shared_directory() -> str:
    """Where the files are made: ``/dev/shm`` where it is a writable directory (memory, not a
    disk), else the system's temporary directory."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def _pid_namespace() -> str:
    """This process's PID namespace (``/proc/self/ns/pid``'s inode; "0" where it cannot be
    read): process ids mean something only within one."""
    try:
        return os.readlink("/proc/self/ns/pid").partition("[")[2].rstrip("]") or "0"
    except OSError:
        return "0"


def shared_file(key: int | str, directory: str | None = None) -> str:
    """The file the processes of a server share (in ``directory``, else
    :func:`shared_directory`): one per user, PID namespace and listening address, ``key`` (its
    port, or :func:`unix_key` of its socket's path)."""
    name = f"lbclient-rif-{os.getuid()}-{_pid_namespace()}-{key}"
    return os.path.join(directory or shared_directory(), name)


def unix_key(path: str) -> str:
    """The key of the file shared by the processes listening on the Unix socket at ``path``."""
    return "unix-" + hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


_LISTEN: Final = "0A"  # a TCP socket's state in /proc/net/tcp: listening
_ACCEPTING: Final = 0x10000  # a Unix socket's flag in /proc/net/unix: listening
_STREAM: Final = "0001"


def _table(name: str, columns: int) -> list[list[str]]:
    """The rows of ``/proc/self/net/<name>``, split into ``columns`` at most (the last keeps its
    spaces: a path); none where it cannot be read."""
    try:
        with open(f"/proc/self/net/{name}", "rb") as file:
            lines = file.read().decode("utf-8", "surrogateescape").split("\n")[1:]
    except OSError:
        return []
    return [line.split(maxsplit=columns - 1) for line in lines]


def _own_sockets() -> set[int]:
    """The inodes of the sockets among this process's open files (``/proc/self/fd``)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return set()
    own = set()
    for name in names:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            own.add(int(target[8:-1]))
    return own


def _listeners() -> dict[int, int | str]:
    """The listening stream sockets among this process's open files, by inode: a TCP socket's
    port, or a Unix socket's path (from the network namespace's tables ``/proc/self/net/tcp``,
    ``tcp6`` and ``unix``). Reads only: no socket of the process is touched."""
    own = _own_sockets()
    if not own:
        return {}
    listening: dict[int, int | str] = {}
    for table in ("tcp", "tcp6"):
        for fields in _table(table, 17):
            try:
                inode = int(fields[9])
                if inode in own and fields[3] == _LISTEN:
                    listening[inode] = int(fields[1].rpartition(":")[2], 16)
            except (IndexError, ValueError):
                continue
    for fields in _table("unix", 8):
        try:
            inode = int(fields[6])
            if (
                inode in own
                and len(fields) == 8
                and int(fields[3], 16) & _ACCEPTING
                and fields[4] == _STREAM
            ):
                listening[inode] = fields[7]
        except (IndexError, ValueError):
            continue
    return listening


def _network_namespace() -> int:
    """This process's network namespace (``/proc/self/ns/net``'s inode; 0 where it cannot be
    read)."""
    try:
        return int(os.readlink("/proc/self/ns/net").partition("[")[2].rstrip("]") or 0)
    except (OSError, ValueError):
        return 0


def find_listener(
    address: int | str | None, *, exact: bool = False
) -> tuple[int, int | str] | None:
    """This process's listening address for requests that came to ``address`` (a TCP port, or a
    Unix socket's path; None: not known): (the server's identity, the key of its file). The
    address itself where this process listens on it; else, unless ``exact`` (the address is the
    socket's own, as ASGI servers give it: a request that came another way, in process, is no
    server's), the process's only listening address (a server's worker listens on its server's
    alone; gunicorn on a Unix socket gives the port of the Host header); else None.

    The identity: for a port, the network namespace (the sockets a port's processes listen on
    may be one, or one each with ``SO_REUSEPORT``, as ``gunicorn --reuse-port`` binds them:
    a client of the port is answered by any); for a Unix socket, the socket's inode."""
    listeners = _listeners()
    wanted = address
    if wanted is None or wanted not in listeners.values():
        addresses = set(listeners.values())
        if exact or len(addresses) != 1:
            return None
        wanted = addresses.pop()
    if isinstance(wanted, int):
        return _network_namespace(), wanted
    return min(inode for inode, where in listeners.items() if where == wanted), unix_key(wanted)


def listening_inode(port: int) -> int | None:
    """The inode of this process's listening TCP socket on ``port`` (the smallest, where an
    IPv4 and an IPv6 socket both listen on it); None where there is none or no ``/proc``."""
    found = [inode for inode, where in _listeners().items() if where == port]
    return min(found) if found else None


@contextlib.contextmanager
def _locked(path: str, *, create: bool) -> Iterator[int]:
    """The file at ``path`` opened (made if ``create``), under an exclusive ``flock`` until the
    block ends; PermissionError, before waiting for its lock, where it is not this user's own
    alone. (Unlocked before it is closed: a mapping of it holds the open file, and with it the
    lock, after the descriptor is closed.)"""
    import fcntl  # Unix only; nothing here runs where there is no /proc

    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        status = os.fstat(fd)  # another user's, or open to others: refused before any wait
        if status.st_uid != os.getuid() or stat.S_IMODE(status.st_mode) & 0o077:
            raise PermissionError(f"{path} is not this user's own")
        for _ in range(LOCK_TRIES):  # held for microseconds: one held longer is a stuck process
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(LOCK_PAUSE)
        else:
            raise TimeoutError(f"{path} stayed locked for {LOCK_TRIES * LOCK_PAUSE:g} s")
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat``); None where
    it does not run (gone, or a zombie) or there is no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rpartition(b")")[2].split()
        if fields[0] == b"Z":
            return None
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, started: int) -> bool:
    return pid > 0 and _started(pid) == started


class Shared:
    """This process's slot in the file of one listening socket, and a view of the others'.

    :meth:`publish` writes this process's count; :meth:`others` adds up the counts of the other
    live slots of the same socket (its list of them made again when the generation moved, or
    :data:`CHECK_EVERY` seconds after the last check, on the clock values given). None of them
    locks: each slot has one writer process, its threads publish with :meth:`track`, and a
    reader sees each word whole."""

    def __init__(self, path: str, file: int, words: memoryview, place: int, server: int) -> None:
        self.path = path
        self._file = file  # the inode of the file mapped (the path may name another later)
        self._words = words
        self._place = place
        self._count = place + _COUNT
        self._server = server
        self._generation = -1
        self._next_check = float("-inf")
        self._counts: tuple[int, ...] = ()
        self._most = 0
        self._left = False
        self._pid = os.getpid()
        is_gil_enabled = getattr(sys, "_is_gil_enabled", None)
        self._free_threaded = is_gil_enabled is not None and not is_gil_enabled()
        self._track_lock = threading.Lock()
        self._counters: list[Counter] = []

    @classmethod
    def join(
        cls, address: int | str | None, *, exact: bool = False, directory: str | None = None
    ) -> Shared | None:
        """This process's slot for the server its requests came to at ``address`` (a port, or a
        Unix socket's path; see :func:`find_listener`); None where sharing is not possible here
        (logged at debug level, or as a warning where the file is refused). Raises TimeoutError
        where the file stayed locked (:data:`LOCK_TRIES`): worth another try later."""
        found = find_listener(address, exact=exact)
        started = _started(os.getpid())
        if found is None or started is None:
            logger.debug("no socket listening at %r: in flight counted per process", address)
            return None
        identity, key = found
        try:
            path = shared_file(key, directory)
        except OSError as error:  # no temporary directory at all
            logger.warning("cannot share requests in flight: %s", error)
            return None
        for _ in range(3):  # the file may be removed by its last owner between open and lock
            try:
                joined = cls._claim(path, identity, started)
            except TimeoutError:
                raise
            except OSError as error:
                logger.warning("cannot share requests in flight through %s: %s", path, error)
                return None
            if joined is not False:
                return joined
        return None

    @classmethod
    def _claim(cls, path: str, server: int, started: int) -> Shared | Literal[False] | None:
        """A slot of the file at ``path`` (False: the file was removed meanwhile, try again)."""
        with _locked(path, create=True) as fd:
            status = os.fstat(fd)
            if status.st_nlink == 0:
                return False
            if status.st_size not in (0, _SIZE):
                logger.warning("%s is not lbclient's: in flight counted per process", path)
                return None
            # Its memory taken now: where the file system is full this is an error to log,
            # where a write to a page of the mapping not yet backed would kill the process.
            os.posix_fallocate(fd, 0, _SIZE)
            words = memoryview(mmap.mmap(fd, _SIZE)).cast("q")
            if words[0] not in (0, _MARK):
                logger.warning("%s is not lbclient's: in flight counted per process", path)
                return None
            words[0] = _MARK
            for slot in range(1, SLOTS + 1):
                place = slot * _WORDS
                owner = words[place + _PID]
                if owner == 0 or not _alive(owner, words[place + _START]):
                    words[place + _PID] = 0  # no reader takes it for its last owner's meanwhile
                    words[place + _COUNT] = 0
                    words[place + _SERVER] = server
                    words[place + _START] = started
                    words[place + _PID] = os.getpid()
                    words[_GENERATION] += 1
                    shared = cls(path, status.st_ino, words, place, server)
                    atexit.register(shared.leave)
                    return shared
            logger.warning("every slot of %s is taken: in flight counted per process", path)
            return None

    def attach(self, counter: Counter) -> None:
        """Let a compiled counter publish its count in this slot and read the others' (as
        :meth:`track` and :meth:`others` do) until :meth:`leave`."""
        if self._left:
            return
        self._counters.append(counter)
        counter.share(self._words, self._count, self._checked)

    def _checked(self, now: float) -> tuple[int, float, tuple[int, ...], int]:
        """What a compiled counter keeps of a check as of ``now``: the generation, the next
        check's time, the other live slots' count words, and the most they may add up to."""
        self._check(now)
        return self._generation, self._next_check, self._counts, self._most

    def publish(self, count: int) -> None:
        """This process's requests in flight, as the others read them."""
        self._words[self._count] = count

    def track(self, flying: Sized) -> None:
        """Publish ``len(flying)``, which other threads may change meanwhile, without a lock:
        written, then read again and written again until it held still, so that whichever
        thread writes last writes what it found after its write."""
        if self._free_threaded:  # no interpreter lock to order the write and the read again
            with self._track_lock:
                self._words[self._count] = len(flying)
            return
        words, place = self._words, self._count
        count = len(flying)
        words[place] = count
        while len(flying) != count:
            count = len(flying)
            words[place] = count

    def arrived(self, flying: Sized, now: float) -> int:
        """:meth:`track`, then :meth:`others`: what a request's arrival does, in one call."""
        words = self._words
        if self._free_threaded:
            with self._track_lock:
                words[self._count] = len(flying)
        else:
            place = self._count
            count = len(flying)
            words[place] = count
            while len(flying) != count:
                count = len(flying)
                words[place] = count
        if words[_GENERATION] != self._generation or now >= self._next_check:
            self._check(now)
        if not self._counts:  # the server's only process
            return 0
        return self._sum(words)

    def others(self, now: float) -> int:
        """The requests in flight of the other live processes of this server."""
        words = self._words
        if words[_GENERATION] != self._generation or now >= self._next_check:
            self._check(now)
        return self._sum(words) if self._counts else 0

    def _sum(self, words: memoryview) -> int:
        """The counts of the other live slots, as :meth:`others` gives them."""
        total: int = sum(map(words.__getitem__, self._counts))
        if 0 <= total <= self._most:
            return total
        # A slot that is not believed (negative, or too many): the others, each checked.
        return sum(
            count for count in map(words.__getitem__, self._counts) if 0 < count <= MOST_PER_SLOT
        )

    def _check(self, now: float) -> None:
        words = self._words
        self._generation = words[_GENERATION]
        self._next_check = now + CHECK_EVERY
        counts = []
        for slot in range(1, SLOTS + 1):
            place = slot * _WORDS
            owner = words[place + _PID]
            if (
                owner != self._pid  # this process's other trackers: each reports its own
                and words[place + _SERVER] == self._server
                and _alive(owner, words[place + _START])
            ):
                counts.append(place + _COUNT)
        self._counts = tuple(counts)
        self._most = MOST_PER_SLOT * len(counts)

    def leave(self) -> None:
        """Give the slot back (at exit, or when the process stops sharing); the last live owner
        removes the file. Safe to call twice, or after a fork (only the slot's owner gives it
        back). Publishing after it writes nowhere; the others read as none."""
        if self._left:
            return
        self._left = True
        for counter in self._counters:  # they write nowhere from now on, as track does
            counter.share(None)
        self._counters.clear()
        words = self._words
        # A request still ending (at exit, in another thread) writes where no one reads: the
        # slot may be another process's by then.
        self._words = memoryview(bytearray(_SIZE)).cast("q")
        if words[self._place + _PID] != os.getpid():
            return  # a forked child's copy: the slot is its parent's
        words[self._count] = 0
        with contextlib.suppress(OSError), _locked(self.path, create=False) as fd:
            if os.fstat(fd).st_ino != self._file:
                return  # the path names another file now: not ours to release through
            words[self._place + _PID] = 0
            words[_GENERATION] += 1
            if not any(
                _alive(words[slot * _WORDS + _PID], words[slot * _WORDS + _START])
                for slot in range(1, SLOTS + 1)
            ):
                os.unlink(self.path)


def discard(key: int | str, directory: str | None = None) -> None:
    """Remove the file of the server that listened at ``key`` (its port, or :func:`unix_key` of
    its path) if no live process owns a slot of it (what a server's supervisor may do once its
    workers are gone: one that ended by a signal leaves it)."""
    path = shared_file(key, directory)
    with contextlib.suppress(OSError), _locked(path, create=False) as fd:
        if os.fstat(fd).st_size != _SIZE:
            return
        with mmap.mmap(fd, _SIZE) as memory:
            words = memoryview(memory).cast("q")
            try:
                if words[0] == _MARK and not any(
                    _alive(words[slot * _WORDS + _PID], words[slot * _WORDS + _START])
                    for slot in range(1, SLOTS + 1)
                ):
                    os.unlink(path)
            finally:
                words.release()
