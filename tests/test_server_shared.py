"""Requests in flight shared by the processes of one server (``lbclient.server._shared`` and the
tracker's use of it): real listening sockets on loopback, real files (in the test's folder),
and real other processes that inherit the listening socket as a server's workers do. Clock
values are given, never read.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbclient.server import LoadReportingASGI, LoadReportingWSGI, LoadTracker, _shared
from lbclient.server._shared import (
    CHECK_EVERY,
    SLOTS,
    Shared,
    discard,
    listening_inode,
    shared_file,
    unix_key,
)
from lbclient.server._tracker import JOIN_RETRY, JOIN_TRIES, _address

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the listening socket is found in Linux's /proc"
)

#: A worker of the server: inherits the listening socket (its descriptor in argv[1]), joins the
#: file's folder (argv[2]), publishes argv[3] requests in flight, says so, then waits for a line
#: on stdin: "leave" gives its slot back and exits, anything else exits without giving it back.
WORKER = textwrap.dedent(
    """
    import socket, sys
    from lbclient.server._shared import Shared
    listener = socket.socket(fileno=int(sys.argv[1]))
    shared = Shared.join(listener.getsockname()[1], directory=sys.argv[2])
    assert shared is not None
    shared.publish(int(sys.argv[3]))
    print("joined", flush=True)
    if sys.stdin.readline().strip() == "leave":
        shared.leave()
    import os
    os._exit(0)
    """
)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    with sock:
        yield sock


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def joined(sock: socket.socket, folder: Path) -> Shared:
    """A slot for ``sock``'s server, in ``folder``."""
    shared = Shared.join(port_of(sock), directory=str(folder))
    assert shared is not None
    return shared


def file_of(folder: Path, sock: socket.socket) -> Path:
    return Path(shared_file(port_of(sock), str(folder)))


def joined_process(script: str, sock: socket.socket, *args: str) -> subprocess.Popen[str]:
    """``script`` run in a new interpreter that inherits ``sock`` (its descriptor the first
    argument, then ``args``), once it says it joined."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(sock.fileno()), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=[sock.fileno()],
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "joined"
    return proc


class Worker:
    """Another process of the server (see WORKER)."""

    def __init__(self, sock: socket.socket, folder: Path, count: int) -> None:
        self.proc = joined_process(WORKER, sock, str(folder), str(count))

    def stop(self, how: str) -> None:
        assert self.proc.stdin is not None
        if how == "kill":
            self.proc.send_signal(signal.SIGKILL)
        else:
            self.proc.stdin.write(how + "\n")
            self.proc.stdin.flush()
        self.proc.wait(timeout=30)
        self.proc.stdin.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        if worker.proc.poll() is None:
            worker.stop("kill")


def test_the_listening_socket_is_found_by_its_port(listener: socket.socket) -> None:
    assert listening_inode(port_of(listener)) == os.fstat(listener.fileno()).st_ino
    # A connected socket's port is not a listening one; a port nobody here listens on neither.
    with socket.create_connection(listener.getsockname()) as client:
        assert listening_inode(port_of(client)) is None
        accepted, _ = listener.accept()
        accepted.close()


def test_slots_of_one_process_leave_each_other_out_and_the_last_removes_the_file(
    listener: socket.socket, tmp_path: Path, workers: list[Worker]
) -> None:
    # Two trackers of one process (two apps, or one wrapped twice): each reports its own.
    first, second = joined(listener, tmp_path), joined(listener, tmp_path)
    path = file_of(tmp_path, listener)
    assert path.stat().st_size == (SLOTS + 1) * 4 * 8
    assert path.stat().st_mode & 0o777 == 0o600
    first.publish(3)
    second.publish(4)
    assert (first.others(0.0), second.others(0.0)) == (0, 0)
    workers.append(Worker(listener, tmp_path, 5))  # another process: both count it
    assert (first.others(0.0), second.others(0.0)) == (5, 5)
    workers[0].stop("leave")
    first.leave()
    assert path.exists()  # a live owner is left
    second.leave()
    second.leave()
    assert not path.exists()  # the last one removed it


def test_a_worker_that_inherits_the_socket_is_counted_until_it_leaves(
    listener: socket.socket, tmp_path: Path, workers: list[Worker]
) -> None:
    shared = joined(listener, tmp_path)
    workers.append(Worker(listener, tmp_path, 5))
    assert shared.others(0.0) == 5  # seen at once: a claim moves the generation
    workers.append(Worker(listener, tmp_path, 2))
    assert shared.others(0.0) == 7
    workers[0].stop("leave")
    assert shared.others(0.0) == 2
    shared.leave()
    workers[1].stop("leave")
    assert not file_of(tmp_path, listener).exists()


def test_a_killed_worker_is_not_counted_and_its_slot_is_taken_again(
    listener: socket.socket, tmp_path: Path, workers: list[Worker]
) -> None:
    shared = joined(listener, tmp_path)
    workers.append(Worker(listener, tmp_path, 6))
    assert shared.others(10.0) == 6
    workers[0].stop("kill")  # its slot still says 6: nobody gave it back
    assert shared.others(10.0 + CHECK_EVERY / 2) == 6  # until the next check of the owners
    assert shared.others(10.0 + CHECK_EVERY) == 0
    workers.append(Worker(listener, tmp_path, 1))  # takes the dead one's slot
    assert shared.others(10.0 + CHECK_EVERY) == 1
    words = memoryview(file_of(tmp_path, listener).read_bytes()).cast("q")
    owners = [words[slot * 4] for slot in range(1, SLOTS + 1) if words[slot * 4]]
    assert sorted(owners) == sorted([os.getpid(), workers[1].proc.pid])
    workers[1].stop("exit")  # gone without giving its slot back either
    shared.leave()  # the last live owner: the file goes
    assert not file_of(tmp_path, listener).exists()


def test_sockets_of_one_port_are_one_server(tmp_path: Path, workers: list[Worker]) -> None:
    # gunicorn --reuse-port binds a socket in each worker (SO_REUSEPORT): a client of the port
    # is answered by any of them, so their processes count together.
    sockets = []
    for _ in range(2):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port_of(sockets[0]) if sockets else 0))
        sock.listen()
        sockets.append(sock)
    try:
        shared = joined(sockets[0], tmp_path)
        sockets[0].close()  # the worker gets the other socket alone
        workers.append(Worker(sockets[1], tmp_path, 9))  # a process with the other socket only
        assert shared.others(0.0) == 9
        workers[0].stop("leave")
        shared.leave()
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize(
    "spoil",
    ["another layout", "another size", "open to others", "a symbolic link"],
)
def test_a_file_not_ours_is_refused_and_each_process_counts_alone(
    spoil: str, listener: socket.socket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = file_of(tmp_path, listener)
    if spoil == "another layout":
        path.write_bytes(b"\x01" * (SLOTS + 1) * 32)
    elif spoil == "another size":
        path.write_bytes(b"\x00" * 100)
    elif spoil == "open to others":
        path.write_bytes(b"")
        path.chmod(0o666)
    else:
        path.symlink_to(tmp_path / "elsewhere")
    with caplog.at_level(logging.WARNING, logger="lbclient.server"):
        assert Shared.join(port_of(listener), directory=str(tmp_path)) is None
    assert str(path) in caplog.text
    assert not (tmp_path / "elsewhere").exists()


def test_when_every_slot_is_taken_the_process_counts_alone(
    listener: socket.socket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    taken = [joined(listener, tmp_path) for _ in range(SLOTS)]
    with caplog.at_level(logging.WARNING, logger="lbclient.server"):
        assert Shared.join(port_of(listener), directory=str(tmp_path)) is None
    assert "every slot" in caplog.text
    for shared in taken:
        shared.leave()
    assert not file_of(tmp_path, listener).exists()


# -- the tracker -----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(_shared, "shared_directory", lambda: str(tmp_path))
    return tmp_path


#: Another worker process with a tracker: inherits the listening socket (argv[1]), makes its
#: shared file in argv[2], then obeys a line at a time: "begin" and "end" a request (answering
#: the requests in flight it reads), "exit" (normally: its slot is given back).
TRACKER_WORKER = textwrap.dedent(
    """
    import socket, sys
    from lbclient.server import LoadTracker, _shared
    _shared.shared_directory = lambda: sys.argv[2]
    listener = socket.socket(fileno=int(sys.argv[1]))
    tracker = LoadTracker()
    tracker.listening(str(listener.getsockname()[1]))  # as WSGI's SERVER_PORT gives it
    assert tracker.shared
    held = []
    print("joined", flush=True)
    for line in sys.stdin:
        if line.strip() == "begin":
            held.append(tracker.begin())
        elif line.strip() == "end":
            tracker.end(held.pop())
        else:
            break
        print(tracker.rif, flush=True)
    """
)


class TrackerWorker:
    """Another process of the server, with a tracker (see TRACKER_WORKER)."""

    def __init__(self, sock: socket.socket, folder: Path) -> None:
        self.proc = joined_process(TRACKER_WORKER, sock, str(folder))

    def tell(self, line: str) -> int:
        """What it reads as in flight after ``line``."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def exit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("exit\n")
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def test_trackers_of_two_processes_count_each_others_requests(
    listener: socket.socket, folder: Path
) -> None:
    clock = Clock()
    here = LoadTracker(clock=clock)
    here.listening(port_of(listener))
    assert here.shared
    there = TrackerWorker(listener, folder)
    try:
        assert [there.tell("begin"), there.tell("begin")] == [1, 2]
        assert here.rif == 2
        arrival = here.begin()
        assert arrival[1] == 2  # it found the server's two in flight, not its process's none
        assert here.report().rif == 3
        assert "named_metrics.rif=2," in here.rendered("TEXT")  # besides the one it answers
        assert there.tell("end") == 2  # its one, and this process's
        here.end(arrival)
        assert [here.rif, there.tell("end"), here.rif] == [1, 0, 0]
        # Nor by one wrapped twice in this process: the other tracker here is not added.
        inner = LoadTracker(clock=clock)
        inner.listening(port_of(listener))
        inner.begin()
        assert [here.rif, inner.rif, there.tell("begin")] == [0, 1, 2]
        inner.drop()
        clock.now += 5.0
        assert here.report().rif == 1
    finally:
        there.exit()
    assert here.rif == 0  # gone, and it gave its slot back


@pytest.mark.parametrize(
    ("given", "address"),
    [
        (8080, 8080),
        ("8080", 8080),
        ("08080", 8080),
        ("/run/app.sock", "/run/app.sock"),
        ("@abstract", "@abstract"),
        (None, None),
        ("", None),
        ("http", None),
        ("\u00b2", None),  # a digit to str.isdigit, not to int()
        ("123456", None),
        (True, None),
        (0, None),
        (70000, None),
        (8080.0, None),
    ],
)
def test_what_a_request_says_of_its_address(given: object, address: object) -> None:
    assert _address(given) == address


def test_a_tracker_told_not_to_share_counts_its_own(listener: socket.socket, folder: Path) -> None:
    tracker = LoadTracker(share_in_flight=False)
    tracker.listening(port_of(listener))
    assert not tracker.shared
    assert tracker.joined
    assert not list(folder.iterdir())


#: A process with the listening sockets argv[2:] asks for ("tcp", "tcp6" on the same port as
#: the tcp one, "unix" at argv[1]/app.sock, "unix-spaced" at argv[1]/"my app.sock", "bound": a
#: TCP socket never listening), then prints
#: what it finds for each address of a list (JSON) on its standard input.
LISTENERS = textwrap.dedent(
    """
    import json, os, socket, sys
    from lbclient.server._shared import find_listener
    folder, kinds = sys.argv[1], sys.argv[2:]
    sockets, port = [], 0
    for kind in kinds:
        if kind.startswith("unix"):
            sock = socket.socket(socket.AF_UNIX)
            path = os.path.join(folder, "app.sock" if kind == "unix" else "my app.sock")
            if os.path.exists(path):
                os.unlink(path)  # left by the last process
            sock.bind(path)
        else:
            sock = socket.socket(socket.AF_INET6 if kind == "tcp6" else socket.AF_INET)
            if kind == "tcp6":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(("::1" if kind == "tcp6" else "127.0.0.1", port))
            port = sock.getsockname()[1]
        if kind != "bound":
            sock.listen()
        sockets.append(sock)
    print(json.dumps({"port": port}), flush=True)
    found = [find_listener(address) for address in json.loads(sys.stdin.readline())]
    print(json.dumps([None if f is None else f[1] for f in found]))
    """
)


def listeners(folder: Path, kinds: list[str], addresses: list[object]) -> list[object]:
    """What a process listening as ``kinds`` says (see LISTENERS): the key of the file found for
    each address ("port" stands for the process's TCP port, asked or found)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LISTENERS, str(folder), *kinds],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    port = json.loads(proc.stdout.readline())["port"]
    asked = [port if address == "port" else address for address in addresses]
    proc.stdin.write(json.dumps(asked) + "\n")
    proc.stdin.close()
    found: list[object] = json.loads(proc.stdout.read())
    proc.stdout.close()
    assert proc.wait(timeout=30) == 0
    return ["port" if key == port else key for key in found]


def test_a_request_of_an_unknown_address_is_the_only_listeners(tmp_path: Path) -> None:
    # gunicorn on a Unix socket gives the Host header's port; a worker listens on one address.
    path = str(tmp_path / "app.sock")
    unix = unix_key(path)
    assert listeners(tmp_path, ["unix"], [80, None, path, "/elsewhere"]) == [unix] * 4
    spaced = str(tmp_path / "my app.sock")
    assert listeners(tmp_path, ["unix-spaced"], [spaced, None]) == [unix_key(spaced)] * 2
    # Two addresses: each found by its own, and which one an unknown address is, not known.
    assert listeners(tmp_path, ["unix", "tcp"], ["port", path, 80, None]) == [
        "port",
        unix,
        None,
        None,
    ]
    assert listeners(tmp_path, ["tcp"], [80, None, "port"]) == ["port"] * 3
    assert listeners(tmp_path, ["bound"], ["port", None]) == [None, None]
    assert listeners(tmp_path, [], [80, None]) == [None, None]


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 here")
def test_ipv4_and_ipv6_on_one_port_are_one_address(tmp_path: Path) -> None:
    try:
        found = listeners(tmp_path, ["tcp", "tcp6"], [80, None, "port"])
    except AssertionError:  # ::1 cannot be bound here
        pytest.skip("no IPv6 loopback here")
    assert found == ["port"] * 3


def test_share_in_flight_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="share_in_flight must be a bool, got 1"):
        LoadTracker(share_in_flight=1)  # type: ignore[arg-type]


async def _ok(scope: object, receive: object, send: object) -> None:
    return None


def test_the_middlewares_tell_the_port_of_their_first_request(
    listener: socket.socket, folder: Path
) -> None:
    import asyncio

    port = port_of(listener)
    asgi = LoadReportingASGI(_ok)
    scope = {"type": "http", "path": "/", "headers": [], "server": ("127.0.0.1", port)}

    async def send(message: object) -> None:
        return None

    async def receive() -> dict[str, object]:
        return {"type": "http.request"}

    asyncio.run(asgi(scope, receive, send))
    assert asgi.tracker.shared

    wsgi = LoadReportingWSGI(lambda environ, start: [b""])
    body = wsgi({"PATH_INFO": "/", "SERVER_PORT": str(port)}, lambda *args: lambda data: None)
    list(body)
    assert wsgi.tracker.shared
    assert asgi.tracker.rif == wsgi.tracker.rif == 0


FORKED = textwrap.dedent(
    """
    import os, socket, sys
    from lbclient.server import LoadTracker
    from lbclient.server import _shared
    _shared.shared_directory = lambda: sys.argv[1]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    tracker = LoadTracker()
    tracker.listening(listener.getsockname()[1])
    assert tracker.shared
    tracker.begin()
    tracker._joining.acquire()  # as if a thread of this process were joining at the fork
    child = os.fork()
    if child == 0:  # not the slot's owner: counts alone until told a port again
        tracker.begin()
        alone = not tracker.shared and not tracker.joined and tracker.rif == 2
        os._exit(0 if alone and tracker._joining.acquire(blocking=False) else 1)
    tracker._joining.release()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    assert tracker.shared
    words = memoryview(open(tracker._shared.path, "rb").read()).cast("q")
    assert [words[i + 3] for i in range(4, len(words), 4) if words[i] == os.getpid()] == [1]
    print("ok")
    """
)


def test_a_forked_child_does_not_write_in_its_parents_slot(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", FORKED, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert not list(tmp_path.iterdir())  # the parent gave its slot back at exit


def test_a_file_locked_too_long_is_tried_again_later(
    listener: socket.socket,
    folder: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fcntl

    monkeypatch.setattr(_shared, "LOCK_TRIES", 2)
    clock = Clock()
    tracker = LoadTracker(clock=clock)
    path = file_of(folder, listener)
    with open(os.open(path, os.O_CREAT | os.O_RDWR, 0o600), "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a process stuck while it holds the lock
        with caplog.at_level(logging.WARNING, logger="lbclient.server"):
            tracker.listening(port_of(listener))
        assert "stayed locked" in caplog.text
        assert not tracker.shared
        assert not tracker.joined
        clock.now += JOIN_RETRY / 2
        caplog.clear()
        tracker.listening(port_of(listener))  # too soon: not tried
        assert not caplog.text
    tracker.listening(port_of(listener))
    assert not tracker.shared
    clock.now += JOIN_RETRY / 2
    tracker.listening(port_of(listener))  # released, and time to try again
    assert tracker.shared
    assert tracker.joined


def test_a_full_file_system_is_a_warning_not_a_crash(
    listener: socket.socket,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A full /dev/shm: the file's memory is taken before any write to it, so the error comes
    # from the allocation (here, made to fail as a full tmpfs fails it) and no page is written.
    import errno

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with caplog.at_level(logging.WARNING, logger="lbclient.server"):
        assert Shared.join(port_of(listener), directory=str(tmp_path)) is None
    assert "No space left on device" in caplog.text
    assert file_of(tmp_path, listener).stat().st_size == 0


def test_finding_the_socket_touches_no_socket_of_the_process(listener: socket.socket) -> None:
    # With a default timeout set, a socket object made over a copy of a descriptor would turn
    # the shared open file non-blocking, and the server's blocking sockets with it.
    listener.setblocking(True)
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5.0)
    try:
        assert listening_inode(port_of(listener)) == os.fstat(listener.fileno()).st_ino
    finally:
        socket.setdefaulttimeout(before)
    assert os.get_blocking(listener.fileno())


def test_the_file_is_one_per_user_pid_namespace_and_port() -> None:
    namespace = os.readlink("/proc/self/ns/pid").partition("[")[2].rstrip("]")
    assert shared_file(8080, "/run") == f"/run/lbclient-rif-{os.getuid()}-{namespace}-8080"


def test_a_supervisor_removes_the_file_only_when_no_owner_lives(
    listener: socket.socket, tmp_path: Path, workers: list[Worker]
) -> None:
    workers.append(Worker(listener, tmp_path, 1))
    discard(port_of(listener), str(tmp_path))
    assert file_of(tmp_path, listener).exists()  # its owner runs
    workers[0].stop("kill")
    discard(port_of(listener), str(tmp_path))
    assert not file_of(tmp_path, listener).exists()
    discard(port_of(listener), str(tmp_path))  # none: nothing to do


def test_a_count_published_after_leaving_reaches_no_slot(
    listener: socket.socket, tmp_path: Path, workers: list[Worker]
) -> None:
    shared = joined(listener, tmp_path)
    workers.append(Worker(listener, tmp_path, 2))
    shared.leave()
    workers.append(Worker(listener, tmp_path, 3))  # may take the slot given back
    shared.publish(50)  # a request ending after the exit began
    reader = joined(listener, tmp_path)
    assert reader.others(0.0) == 5
    assert shared.others(0.0) == 0
    for worker in workers:
        worker.stop("leave")
    reader.leave()


def test_the_count_published_by_many_threads_is_the_count_once_they_rest(
    listener: socket.socket, folder: Path
) -> None:
    import threading

    tracker = LoadTracker()
    tracker.listening(port_of(listener))
    assert tracker.shared
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switched as often as the interpreter allows

    def work() -> None:
        for _ in range(2_000):
            tracker.end(tracker.begin())
        tracker.begin()  # each leaves one in flight

    try:
        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    words = memoryview(file_of(folder, listener).read_bytes()).cast("q")
    published = [words[i + 3] for i in range(4, len(words), 4) if words[i] == os.getpid()]
    assert published == [8]
    assert tracker.rif == 8


def test_a_file_locked_at_every_try_is_given_up(
    listener: socket.socket, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    monkeypatch.setattr(_shared, "LOCK_TRIES", 2)
    clock = Clock()
    tracker = LoadTracker(clock=clock)
    with open(os.open(file_of(folder, listener), os.O_CREAT | os.O_RDWR, 0o600), "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        for _ in range(JOIN_TRIES):
            assert not tracker.joined
            tracker.listening(port_of(listener))
            clock.now += JOIN_RETRY
    assert tracker.joined  # no more tries: each would stall a request
    assert not tracker.shared


def test_a_file_not_ours_is_refused_without_waiting_for_its_lock(
    listener: socket.socket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    monkeypatch.setattr(_shared, "LOCK_TRIES", 10**9)  # a wait would be this test's timeout
    path = file_of(tmp_path, listener)
    with open(os.open(path, os.O_CREAT | os.O_RDWR, 0o600), "wb") as held:
        os.chmod(path, 0o666)  # open to others: anyone could write the counts
        fcntl.flock(held, fcntl.LOCK_EX)
        assert Shared.join(port_of(listener), directory=str(tmp_path)) is None


@pytest.mark.parametrize("failing", ["shared_directory", "find_listener"])
def test_whatever_fails_in_joining_never_reaches_the_request(
    failing: str,
    listener: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def fails(*args: object, **kwargs: object) -> str:
        if failing == "shared_directory":  # no /dev/shm, and no temporary directory at all
            raise FileNotFoundError("No usable temporary directory found")
        raise RuntimeError("unexpected")

    monkeypatch.setattr(_shared, failing, fails)
    tracker = LoadTracker()
    with caplog.at_level(logging.WARNING, logger="lbclient.server"):
        tracker.listening(port_of(listener))
    assert tracker.joined
    assert not tracker.shared
    assert "counted per process" in caplog.text or "cannot share" in caplog.text
    tracker.end(tracker.begin())  # and requests are counted as ever
    assert tracker.rif == 0


def test_an_asgi_request_of_another_address_is_no_servers(
    listener: socket.socket, folder: Path
) -> None:
    # What an ASGI server says is its socket's own: a request sent in process (httpx's
    # ASGITransport says ("testserver", 80)) is not taken for the process's listener's.
    tracker = LoadTracker()
    tracker.listening(80, exact=True)
    assert tracker.joined
    assert not tracker.shared
    assert not list(folder.iterdir())


def test_a_tracker_dropped_gives_its_slot_back(listener: socket.socket, folder: Path) -> None:
    import gc

    tracker = LoadTracker()
    tracker.listening(port_of(listener))
    assert tracker.shared
    assert file_of(folder, listener).exists()
    del tracker
    gc.collect()
    assert not file_of(folder, listener).exists()  # its slot was the last
