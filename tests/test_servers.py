"""The test servers themselves: modes, keep-alive, kill/restart, TLS, and clean shutdown."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests

from lbclient.testing import (
    Exchange,
    H2TestServer,
    RecordedRequest,
    TestServer,
    TLSCerts,
    closed_port,
    serve,
)

pytestmark = pytest.mark.timeout(60)

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    """Every server thread a test started is gone when it ends, and none was non-daemon."""
    before = set(threading.enumerate())
    yield
    new = [t for t in threading.enumerate() if t not in before]
    assert [t for t in new if t.name.startswith("TestServer-")] == []
    assert [t for t in new if not t.daemon] == []


@pytest.fixture
def server() -> Iterator[TestServer]:
    with TestServer(name="s1") as s:
        yield s
    assert s.errors == []  # no unexpected exception in any handler thread


def raw_request(
    port: int, data: bytes, *, until_eof: bool = True, timeout: float = 5.0
) -> tuple[socket.socket, bytes]:
    """Send ``data`` on a new connection; read until EOF (or one short read when not)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(data)
    chunks = []
    while True:
        chunk = sock.recv(65536)
        chunks.append(chunk)
        if not chunk or not until_eof:
            break
    return sock, b"".join(chunks)


def recv_eof(sock: socket.socket, timeout: float = 2.0) -> bytes:
    """Everything up to the peer's EOF; fails the test if it does not come within ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One response with a Content-Length from a connection that stays open: (head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "EOF before the end of the head"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"\r\nContent-Length: (\d+)", head)
    assert match is not None
    while len(body) < int(match[1]):
        chunk = sock.recv(65536)
        assert chunk, "EOF before the end of the body"
        body += chunk
    return head, body


def wait_for(predicate: object, timeout: float = 2.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def refused(port: int) -> bool:
    """Whether a connection to 127.0.0.1:``port`` is refused (nothing listens there)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # the listener closed with this connection in its backlog
        return False
    return False


def unread(sock: socket.socket) -> int | None:
    """The bytes ``sock`` (a loopback client's socket) sent that its server has not read yet:
    the receive queue of the server's end in Linux's /proc/net/tcp; None where it cannot be
    seen."""
    host, port = sock.getsockname()[:2]
    peer_host, peer_port = sock.getpeername()[:2]

    def hexed(address: str, number: int) -> str:
        return f"{int.from_bytes(socket.inet_aton(address), 'little'):08X}:{number:04X}"

    try:
        table = Path("/proc/net/tcp").read_text(encoding="ascii").splitlines()[1:]
    except OSError:
        return None
    ours = (hexed(peer_host, peer_port), hexed(host, port))  # the server's end: local, remote
    for line in table:
        fields = line.split()
        if (fields[1], fields[2]) == ours:
            return int(fields[4].split(":")[1], 16)  # tx_queue:rx_queue
    return None


def wait_until_read(sock: socket.socket) -> None:
    """Until the server has read everything ``sock`` sent (where the kernel's receive queue
    cannot be seen, after a pause that lets it)."""
    if unread(sock) is None:
        time.sleep(0.1)
    else:
        wait_for(lambda: unread(sock) == 0)


# -- ok / status -------------------------------------------------------------------------------


def test_ok_json_fields_and_keep_alive(server: TestServer) -> None:
    with httpx.Client() as client:
        first = client.get(f"{server.url}/a/b?x=1&y=two")
        second = client.get(f"{server.url}/c")
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/json"
    assert int(first.headers["content-length"]) == len(first.content)
    assert first.json() == {
        "server": "s1",
        "port": server.port,
        "method": "GET",
        "path": "/a/b?x=1&y=two",
        "host": server.address,
        "body_length": 0,
        "body_sha256": EMPTY_SHA256,
    }
    assert second.json()["path"] == "/c"
    assert server.count() == 2
    assert server.count("GET") == 2
    assert server.count("post") == 0
    one, two = server.requests
    assert isinstance(one, RecordedRequest)
    assert one.peer[1] == two.peer[1]  # the same client port: one reused connection
    assert one.connection == two.connection
    assert one.headers["host"] == server.address
    assert one.tls_server_name is None


def test_defaults_name_address_url() -> None:
    s = TestServer()
    with pytest.raises(RuntimeError):
        _ = s.address
    with s:
        assert s.port > 0
        assert s.address == f"127.0.0.1:{s.port}"
        assert s.name == s.address
        assert s.url == f"http://127.0.0.1:{s.port}"
        assert httpx.get(s.url).json()["server"] == s.address


def test_new_connection_per_client(server: TestServer) -> None:
    for _ in range(2):
        with httpx.Client() as client:
            client.get(server.url)
    assert server.requests[0].connection != server.requests[1].connection


def test_chunked_post_body_recorded(server: TestServer) -> None:
    parts = [b"part-1;", b"", b"x" * 70_000, b"end"]
    body = b"".join(parts)
    with httpx.Client() as client:
        response = client.post(f"{server.url}/upload", content=iter(parts))
    assert response.json()["body_length"] == len(body)
    assert response.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    (recorded,) = server.requests
    assert recorded.method == "POST"
    assert recorded.headers["transfer-encoding"] == "chunked"
    assert recorded.body == body


def test_content_length_body_with_requests(server: TestServer) -> None:
    with requests.Session() as session:
        response = session.put(f"{server.url}/r", data=b"hello", timeout=5)
        again = session.get(f"{server.url}/r2", timeout=5)
    assert response.json()["body_length"] == 5
    assert again.status_code == 200
    first, second = server.requests
    assert first.body == b"hello"
    assert first.headers["content-length"] == "5"
    assert first.connection == second.connection


def test_status_mode_set_at_runtime(server: TestServer) -> None:
    with httpx.Client() as client:
        assert client.get(server.url).status_code == 200
        server.mode = "status:503"
        response = client.get(f"{server.url}/down")
        assert response.status_code == 503
        assert response.json()["path"] == "/down"
        assert response.json()["server"] == "s1"
        server.mode = "ok"
        assert client.get(server.url).status_code == 200
    assert len({r.connection for r in server.requests}) == 1  # keep-alive throughout
    assert server.count() == 3


def test_status_mode_from_constructor_and_bad_modes() -> None:
    with TestServer("status:418") as s:
        assert httpx.get(s.url).status_code == 418
        with pytest.raises(ValueError, match="mode"):
            s.mode = "status:abc"
        with pytest.raises(ValueError, match="mode"):
            s.mode = "teapot"
        assert s.mode == "status:418"
    with pytest.raises(ValueError, match="mode"):
        TestServer("status:99")


def test_head_has_no_body(server: TestServer) -> None:
    with httpx.Client() as client:
        head = client.head(server.url)
        get = client.get(server.url)  # still in sync on the same connection
    assert head.status_code == 200
    assert head.content == b""
    assert get.json()["method"] == "GET"


def test_client_connection_close_closes() -> None:
    with TestServer() as s:
        request = b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        sock, data = raw_request(s.port, request)
        sock.close()
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nConnection: close\r\n" in data
        assert s.requests[0].headers["host"] == "h"


def test_http10_closes_and_pipelining_works(server: TestServer) -> None:
    sock, data = raw_request(server.port, b"GET /old HTTP/1.0\r\n\r\n")
    sock.close()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert data.endswith(b"}")

    pipelined = (
        b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /3 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    sock, data = raw_request(server.port, pipelined)
    sock.close()
    assert data.count(b"HTTP/1.1 200 OK") == 3
    assert [r.target for r in server.requests[1:]] == ["/1", "/2", "/3"]
    assert server.requests[2].body == b"abc"


def test_malformed_request_gets_400_and_is_not_recorded(server: TestServer) -> None:
    sock, data = raw_request(server.port, b"NONSENSE\r\n\r\n")
    sock.close()
    assert data.startswith(b"HTTP/1.1 400 ")
    assert server.count() == 0
    assert httpx.get(server.url).status_code == 200


def test_chunked_extensions_trailers_and_what_follows(server: TestServer) -> None:
    request = (
        b"\r\n"  # an empty line before a request is ignored
        b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
        b"X-Twice: 1\r\nx-twice: 2\r\n\r\n"
        b"5;name=value\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: t\r\n\r\n"
        b"GET /next?q=1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    sock, data = raw_request(server.port, request)
    sock.close()
    assert data.count(b"HTTP/1.1 200 OK") == 2
    first, second = server.requests
    assert first.body == b"hello world!"
    assert first.headers["x-twice"] == "2"  # the last of a repeated header
    assert "x-trailer" not in first.headers
    assert (second.method, second.target, second.body) == ("GET", "/next?q=1", b"")
    assert first.connection == second.connection


def test_http10_keep_alive_stays_open(server: TestServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        for path in (b"/a", b"/b"):
            sock.sendall(b"GET " + path + b" HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            head, body = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"\r\nConnection: keep-alive" in head
            assert body.endswith(b"}")
    first, second = server.requests
    assert first.connection == second.connection


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", 400, id="request-line"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n", 400, id="header"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 12x\r\n\r\n", 400, id="length"
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            400,
            id="chunk-size",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 268435457\r\n\r\n",
            413,
            id="body-over-256MiB",
        ),
        # exactly one byte over 64 KiB, so that the server has read all of it when it answers
        pytest.param(
            (b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: ").ljust(64 * 1024 + 1, b"a"),
            431,
            id="head-over-64KiB",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
            id="transfer-coding",
        ),
    ],
)
def test_bad_requests_are_answered_and_closed(
    server: TestServer, request_bytes: bytes, status: int
) -> None:
    sock, data = raw_request(server.port, request_bytes)  # reads until the server closes
    sock.close()
    assert data.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"\r\nConnection: close\r\n" in data
    assert server.count() == 0


def test_delay() -> None:
    with TestServer(delay=0.3) as s:
        started = time.monotonic()
        assert httpx.get(s.url).status_code == 200
        assert time.monotonic() - started >= 0.3


# -- failure modes -----------------------------------------------------------------------------


def test_hang_times_out_and_is_recorded_once() -> None:
    with TestServer("hang", name="hang") as s:
        with httpx.Client(timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
            client.post(f"{s.url}/slow", content=b"payload")
        assert s.count() == 1
        assert s.requests[0].body == b"payload"
        assert s.count("POST") == 1
        started = time.monotonic()
    assert time.monotonic() - started < 1.0  # closing does not wait for hang_seconds


def test_hang_releases_on_kill_and_after_hang_seconds() -> None:
    with TestServer("hang", hang_seconds=30.0) as s:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        wait_for(lambda: s.count() == 1)
        started = time.monotonic()
        s.kill()
        assert time.monotonic() - started < 1.0
        assert recv_eof(sock) == b""
        sock.close()

    with TestServer("hang", hang_seconds=0.3) as s:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        started = time.monotonic()
        assert recv_eof(sock, timeout=3.0) == b""
        assert 0.2 < time.monotonic() - started < 2.0
        sock.close()


def test_reset_mid_body() -> None:
    with TestServer("reset") as s:
        with httpx.Client() as client, client.stream("GET", s.url) as response:
            assert response.status_code == 200
            assert response.headers["content-length"] == "100000"
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                response.read()
        assert s.count() == 1

        sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        received = b""
        with pytest.raises(ConnectionResetError):  # noqa: PT012 - read until the RST
            while chunk := sock.recv(65536):
                received += chunk
            pytest.fail("clean EOF instead of RST")
        sock.close()
        assert received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert received.endswith(b"\r\n\r\n0123456789")


def test_close_mode() -> None:
    with TestServer("close") as s:
        with httpx.Client() as client, pytest.raises(httpx.RemoteProtocolError):
            client.post(s.url, content=b"data")
        assert s.count("POST") == 1
        assert s.requests[0].body == b"data"


# -- behaviours of one's own -------------------------------------------------------------------


def test_own_behaviour_gets_argument_and_answers_through_httpx() -> None:
    seen: list[tuple[str | None, bool]] = []

    def made(exchange: Exchange) -> bool:
        recorded = any(r is exchange.request for r in exchange.server.requests)
        seen.append((exchange.arg, recorded))
        what = exchange.arg or "nothing"
        headers = {"Content-Type": "text/plain", "X-Arg": what}
        return exchange.respond(201, f"made {what}".encode(), headers)

    with TestServer("made:a thing", behaviours={"made": made}) as s, httpx.Client() as client:
        first = client.post(f"{s.url}/things", content=b"x")
        s.mode = "made"
        second = client.get(f"{s.url}/things")
        s.mode = "ok"
        third = client.get(f"{s.url}/plain")
    assert first.status_code == 201
    assert first.text == "made a thing"
    assert first.headers["x-arg"] == "a thing"
    assert first.headers["content-type"] == "text/plain"
    assert first.headers["x-test-server"] == s.name
    assert second.text == "made nothing"
    assert third.json()["path"] == "/plain"
    assert seen == [("a thing", True), (None, True)]  # recorded before the behaviour ran
    assert len({r.connection for r in s.requests}) == 1  # respond() kept the connection open
    assert s.errors == []


def test_own_behaviour_sends_the_head_in_pieces() -> None:
    go_on = threading.Event()

    def slow_head(exchange: Exchange) -> bool:
        exchange.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n")
        assert go_on.wait(5)
        exchange.send(b"Content-Length: 5\r\n\r\nhello")
        return exchange.keep_alive

    with TestServer("slow-head", behaviours={"slow-head": slow_head}) as s:
        try:
            with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                first = b""
                while not first.endswith(b"text/plain\r\n"):
                    chunk = sock.recv(65536)
                    assert chunk
                    first += chunk
                assert first == b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                go_on.set()
                rest = b""
                while not rest.endswith(b"hello"):
                    chunk = sock.recv(65536)
                    assert chunk
                    rest += chunk
                assert rest == b"Content-Length: 5\r\n\r\nhello"
        finally:
            go_on.set()
        response = httpx.get(s.url)
        assert response.status_code == 200
        assert response.text == "hello"
    assert s.errors == []


def test_own_behaviour_sends_a_malformed_status_line() -> None:
    def garbage(exchange: Exchange) -> bool:
        exchange.send(b"HTTP/1.1 two hundred\r\n\r\n")
        return exchange.close()

    with TestServer("garbage", behaviours={"garbage": garbage}) as s:
        with httpx.Client() as client, pytest.raises(httpx.RemoteProtocolError):
            client.get(s.url)
        sock, data = raw_request(s.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        sock.close()
        assert data == b"HTTP/1.1 two hundred\r\n\r\n"
        assert s.count() == 2
    assert s.errors == []


def test_own_behaviour_that_raises_closes_and_is_kept() -> None:
    def broken(exchange: Exchange) -> bool:
        raise RuntimeError("broken behaviour")

    with TestServer("broken", behaviours={"broken": broken}) as s:
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(s.url)
        s.mode = "ok"
        assert httpx.get(s.url).status_code == 200
    assert [str(e) for e in s.errors] == ["broken behaviour"]
    assert s.count() == 2


def test_unknown_mode_is_named_with_the_known_ones() -> None:
    def mine(exchange: Exchange) -> bool:
        return exchange.respond()

    known = "ok, status:NNN, hang, reset, close, mine"
    with pytest.raises(ValueError, match=f"'nope'.*{known}$"):
        TestServer("nope", behaviours={"mine": mine})
    s = TestServer("mine", behaviours={"mine": mine})
    with pytest.raises(ValueError, match="'mine2'"):
        s.mode = "mine2"
    with pytest.raises(ValueError, match=r"'ok:1'.*no argument"):
        s.mode = "ok:1"
    with pytest.raises(ValueError, match=r"'status'.*status:NNN"):
        s.mode = "status"
    assert s.mode == "mine"
    s.mode = "mine:any text at all"  # one's own behaviours take any argument
    assert s.mode == "mine:any text at all"
    with pytest.raises(ValueError, match="'hang:1'"):
        TestServer(behaviours={"hang:1": mine})
    replaced = TestServer("status:anything", behaviours={"status": mine})  # replaces the built-in
    assert replaced.mode == "status:anything"


def test_closed_port_refuses() -> None:
    ports = [closed_port() for _ in range(3)]
    assert len(set(ports)) == 3
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{ports[0]}/", timeout=2)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", ports[1]), timeout=2)


# -- kill / restart ----------------------------------------------------------------------------


def test_kill_refuses_then_restart_serves_same_port() -> None:
    s = TestServer("status:500", name="phoenix").start()
    try:
        port = s.port
        with httpx.Client() as client:
            assert client.get(s.url).status_code == 500
            s.kill()
            s.kill()  # idempotent
            assert not s.running
            with pytest.raises(httpx.ConnectError):
                client.get(s.url)  # the pooled connection is dead, the new connect refused
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=2)
            s.restart()
            assert s.port == port
            response = client.get(s.url)
            assert response.status_code == 500
            assert response.json()["server"] == "phoenix"
        assert s.count() == 2
        s.restart()  # while running: kill then start
        assert httpx.get(s.url).status_code == 500
    finally:
        s.close()
        s.close()
    with pytest.raises(RuntimeError):
        s.start().start()
    s.close()


def test_kill_closes_idle_keep_alive_connections(server: TestServer) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert b"Connection: close" not in first
    started = time.monotonic()
    server.kill()
    assert time.monotonic() - started < 1.0
    assert recv_eof(sock) == b""
    sock.close()


def test_kill_finishes_in_flight_requests_with_connection_close() -> None:
    release = threading.Event()

    def held(exchange: Exchange) -> bool:
        while not release.is_set():  # in flight until the test has seen the listener close
            exchange.sleep(0.01)  # kill() lets a sleeping request finish, as with delay=
        return exchange.respond()

    with TestServer("held", behaviours={"held": held}) as s:
        results: list[httpx.Response | BaseException] = []

        def call() -> None:
            try:
                with httpx.Client(timeout=5) as client:
                    results.append(client.get(f"{s.url}/inflight"))
            except BaseException as exc:
                results.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        wait_for(lambda: s.count() == 1)
        killer = threading.Thread(target=s.kill)
        killer.start()
        wait_for(lambda: not s.running)
        # the listener closes before the in-flight request finishes
        wait_for(lambda: refused(s.port))
        assert killer.is_alive()  # kill() waits for the answer in flight
        assert not results
        release.set()
        killer.join(5)
        caller.join(5)
        (response,) = results
        assert isinstance(response, httpx.Response)
        assert response.status_code == 200
        assert response.headers["connection"] == "close"


def test_kill_lets_a_partly_sent_request_finish() -> None:
    with TestServer() as s:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        sock.sendall(b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nab")
        wait_until_read(sock)  # the server is reading the request: no longer idle
        killer = threading.Thread(target=s.kill)
        killer.start()
        wait_for(lambda: refused(s.port))  # kill() has begun: the listener is closed
        sock.sendall(b"cd")
        data = recv_eof(sock)
        killer.join(5)
        sock.close()
        assert data.startswith(b"HTTP/1.1 200 OK")
        assert b"Connection: close" in data
        assert s.requests[0].body == b"abcd"


def test_no_fd_leak() -> None:
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        pytest.skip("needs /proc/self/fd")
    before = len(os.listdir(fd_dir))
    for mode in ("ok", "status:503", "hang", "reset", "close"):
        with TestServer(mode, hang_seconds=5) as s, httpx.Client(timeout=0.3) as client:
            with contextlib.suppress(httpx.HTTPError):
                client.get(s.url).read()
            s.restart()
    assert len(os.listdir(fd_dir)) <= before


def test_serve_helper() -> None:
    a, b = TestServer(name="a"), TestServer(name="b")
    with serve(a, b):
        assert httpx.get(a.url).json()["server"] == "a"
        assert httpx.get(b.url).json()["server"] == "b"
    assert not a.running
    assert not b.running


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        s = TestServer(host="::1").start()
    except OSError:
        pytest.skip("cannot bind ::1")
    with s:
        assert s.address == f"[::1]:{s.port}"
        assert s.url == f"http://[::1]:{s.port}"
        assert httpx.get(s.url).status_code == 200


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs() -> TLSCerts:
    return TLSCerts("users.internal")


def test_tls_with_sni(certs: TLSCerts) -> None:
    with TestServer(ssl_context=certs.server_context(), name="tls") as s:
        assert s.url == f"https://127.0.0.1:{s.port}"
        with httpx.Client(verify=certs.client_context()) as client:
            response = client.get(f"{s.url}/secure", extensions={"sni_hostname": "users.internal"})
        assert response.status_code == 200
        assert response.json()["server"] == "tls"
        (recorded,) = s.requests
        assert recorded.tls_server_name == "users.internal"
        assert recorded.headers["host"] == s.address


def test_tls_wrong_name_fails_and_server_survives(certs: TLSCerts) -> None:
    with TestServer(ssl_context=certs.server_context()) as s:
        for _ in range(2):
            with (
                httpx.Client(verify=certs.client_context()) as client,
                pytest.raises(httpx.ConnectError),
            ):
                client.get(s.url, extensions={"sni_hostname": "other.name"})
        with (
            httpx.Client(verify=certs.client_context()) as client,
            pytest.raises(httpx.ConnectError),
        ):
            client.get(s.url)  # no SNI for an IP, and the certificate has no IP
        # a client that never finishes its handshake does not block anything
        idle = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        with httpx.Client(verify=certs.client_context()) as client:
            ok = client.get(s.url, extensions={"sni_hostname": "users.internal"})
        assert ok.status_code == 200
        assert s.count() == 1
        assert s.errors == []
    assert recv_eof(idle) == b""
    idle.close()


def test_tls_hang_and_requests_with_ca_file(certs: TLSCerts, tmp_path: Path) -> None:
    with TestServer("hang", ssl_context=certs.server_context()) as s:
        with (
            httpx.Client(verify=certs.client_context(), timeout=0.5) as client,
            pytest.raises(httpx.ReadTimeout),
        ):
            client.get(s.url, extensions={"sni_hostname": "users.internal"})
        assert s.count() == 1
        assert s.requests[0].tls_server_name == "users.internal"
        s.mode = "ok"
        ca = certs.write_ca(tmp_path / "ca.pem")
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(s.url, verify=str(ca), timeout=5)  # IP is not in the certificate


# -- HTTP/2 ------------------------------------------------------------------------------------


def h2_client(certs: TLSCerts) -> httpx.Client:
    return httpx.Client(http2=True, verify=certs.client_context(), timeout=10)


SNI = {"sni_hostname": "users.internal"}


def start_held(server: H2TestServer, thread: threading.Thread) -> None:
    """Start ``thread`` (one request to a holding ``server``) and wait until its request is
    open there. One at a time: httpcore's sync HTTP/2 takes a stream id and sends its HEADERS
    in two steps, so streams opened by several threads at the same moment may break the
    connection."""
    before = server.count()
    thread.start()
    wait_for(lambda: server.count() > before, timeout=10)


@pytest.fixture
def h2(certs: TLSCerts) -> Iterator[H2TestServer]:
    with H2TestServer(name="h2", ssl_context=certs.server_context(alpn=["h2"])) as s:
        yield s
    assert s.errors == []


def test_h2_json_fields_streams_and_sni(h2: H2TestServer, certs: TLSCerts) -> None:
    assert h2.url == f"https://127.0.0.1:{h2.port}"
    with h2_client(certs) as client:
        first = client.get(f"{h2.url}/a?x=1", extensions=SNI)
        second = client.post(f"{h2.url}/b", content=b"hello", extensions=SNI)
        head = client.head(f"{h2.url}/c", extensions=SNI)
    assert first.http_version == "HTTP/2"
    assert first.headers["content-type"] == "application/json"
    assert first.headers["x-test-server"] == "h2"
    assert first.json() == {
        "server": "h2",
        "port": h2.port,
        "method": "GET",
        "path": "/a?x=1",
        "host": h2.address,
        "body_length": 0,
        "body_sha256": EMPTY_SHA256,
    }
    body = second.json()
    assert (body["method"], body["body_length"]) == ("POST", 5)
    assert body["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert (head.status_code, head.content) == (200, b"")
    assert (h2.count(), h2.count("post"), h2.count("GET")) == (3, 1, 1)
    one, two, three = h2.requests
    assert one.connection == two.connection == three.connection  # one connection, three streams
    assert [one.stream, two.stream, three.stream] == [1, 3, 5]
    assert one.headers[":authority"] == h2.address
    assert two.body == b"hello"
    assert {r.tls_server_name for r in h2.requests} == {"users.internal"}


def test_h2_status_and_hold_modes(h2: H2TestServer, certs: TLSCerts) -> None:
    h2.mode = "status:503"
    with h2_client(certs) as client:
        response = client.get(h2.url, extensions=SNI)
        assert response.status_code == 503
        assert response.json()["server"] == "h2"
        h2.mode = "hold"
        results: list[httpx.Response] = []
        threads = [
            threading.Thread(target=lambda: results.append(client.get(h2.url, extensions=SNI)))
            for _ in range(3)
        ]
        for thread in threads:
            start_held(h2, thread)
        assert results == []  # recorded, held
        h2.mode = "status:201"  # held requests are answered in the new mode
        for thread in threads:
            thread.join(10)
    assert [r.status_code for r in results] == [201] * 3
    assert len({r.connection for r in h2.requests}) == 1


def test_h2_bad_modes() -> None:
    for mode in ("hang", "status:99", "status:abc", "status", ""):
        with pytest.raises(ValueError, match="modes are ok, status:NNN, hold"):
            H2TestServer(mode)
    server = H2TestServer()
    with pytest.raises(ValueError, match="status:NNN"):
        server.mode = "reset"
    assert server.mode == "ok"
    with pytest.raises(RuntimeError, match="start"):
        _ = server.address


def test_h2_cleartext_prior_knowledge() -> None:
    with (
        H2TestServer(name="h2c") as s,
        httpx.Client(http1=False, http2=True) as client,
    ):
        response = client.get(f"{s.url}/plain")
        assert s.url.startswith("http://")
        assert response.http_version == "HTTP/2"
        assert response.json()["path"] == "/plain"
        assert s.requests[0].tls_server_name is None
        assert s.errors == []


def test_h2_client_without_h2_is_turned_away(h2: H2TestServer, certs: TLSCerts) -> None:
    with (
        httpx.Client(verify=certs.client_context()) as client,  # offers http/1.1 only
        pytest.raises(httpx.RemoteProtocolError),
    ):
        client.get(h2.url, extensions=SNI)
    assert h2.count() == 0
    with h2_client(certs) as client:
        assert client.get(h2.url, extensions=SNI).status_code == 200


def test_h2_kill_drops_streams_in_flight_and_start_listens_again(certs: TLSCerts) -> None:
    s = H2TestServer("hold", name="dies", ssl_context=certs.server_context(alpn=["h2"])).start()
    try:
        port = s.port
        with h2_client(certs) as client:
            errors: list[BaseException] = []

            def held() -> None:
                try:
                    client.get(s.url, extensions=SNI)
                except httpx.HTTPError as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=held) for _ in range(2)]
            for thread in threads:
                start_held(s, thread)
            s.kill()
            s.kill()  # idempotent
            for thread in threads:
                thread.join(10)
            assert [type(e) for e in errors] == [httpx.RemoteProtocolError] * 2
            assert not s.running
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=2)
            s.mode = "ok"
            s.start()
            assert s.port == port
            assert client.get(s.url, extensions=SNI).json()["server"] == "dies"
        assert s.errors == []
    finally:
        s.close()


def test_h2_tls_context_alpn() -> None:
    certs = TLSCerts("users.internal")
    with (
        TestServer(ssl_context=certs.server_context()) as s,
        httpx.Client(http2=True, verify=certs.client_context()) as client,
    ):
        response = client.get(s.url, extensions=SNI)  # the HTTP/1.1 server does not offer h2
    assert response.http_version == "HTTP/1.1"
