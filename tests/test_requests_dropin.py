"""LBAdapter gives what a plain requests Session gives, side by side against real servers on
127.0.0.1: streamed bodies read with ``iter_content(None)``, cookies of streamed responses,
``response.raw`` as a file object, a urllib3 ``Timeout`` with a ``total``, no proxy credentials
sent to a backend, and a POST never sent twice when TLS breaks after it went out."""

from __future__ import annotations

import io
import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from urllib3.util import Timeout

from lbclient import LBAdapter, RoundRobin
from lbclient.retry import Failure
from lbclient.testing import Exchange, TestServer, TLSCerts

pytestmark = pytest.mark.timeout(120)


def _cookie(exchange: Exchange) -> bool:
    return exchange.respond(headers={"Set-Cookie": "a=1; Path=/"})


def _moved(exchange: Exchange) -> bool:
    if exchange.request.target != "/moved":
        return exchange.respond()
    return exchange.respond(302, b"", {"Location": "/landing", "Set-Cookie": "r=1; Path=/"})


def _lines(exchange: Exchange) -> bool:
    size = int(exchange.arg or 0)
    body = b"".join(b"line %d\n" % i for i in range(size)) + b"tail"
    return exchange.respond(body=body, headers={"Content-Type": "text/plain"})


def _empty(exchange: Exchange) -> bool:
    return exchange.respond(body=b"", headers={"Content-Type": "text/plain"})


BEHAVIOURS = {"cookie": _cookie, "moved": _moved, "lines": _lines, "empty": _empty}


@pytest.fixture
def server() -> Iterator[TestServer]:
    backend = TestServer(behaviours=BEHAVIOURS).start()
    yield backend
    backend.close()


def sessions(server: TestServer) -> tuple[requests.Session, requests.Session]:
    """A plain session (to the backend's own address) and one through LBAdapter (``users``)."""
    balanced = requests.Session()
    balanced.mount("http://users/", LBAdapter([server.address]))
    return requests.Session(), balanced


def both(server: TestServer, call: Callable[[requests.Session, str], Any]) -> tuple[Any, Any]:
    """What ``call(session, base_url)`` gives plain and through the adapter."""
    plain, balanced = sessions(server)
    with plain, balanced:
        return call(plain, server.url), call(balanced, "http://users")


def in_thread(function: Callable[[], Any], seconds: float = 20.0) -> Any:
    """``function()``, or a failure if it has not returned within ``seconds`` (a hang)."""
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(function()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert result, f"still running after {seconds} s"
    return result[0]


@pytest.mark.parametrize("size", [0, 3, 2000])
def test_iter_content_of_no_chunk_size_ends(server: TestServer, size: int) -> None:
    # A small body is read before it is returned (to retry a connection lost mid-body): what
    # stands in for it must end a read of chunk_size=None as a socket's body does.
    server.mode = f"lines:{size}"

    def read(session: requests.Session, base: str) -> bytes:
        with session.get(f"{base}/lines", stream=True) as response:
            return b"".join(response.iter_content(chunk_size=None))

    plain, balanced = in_thread(lambda: both(server, read))
    assert plain.endswith(b"tail")
    assert balanced == plain


def test_streamed_responses_keep_their_cookies(server: TestServer) -> None:
    server.mode = "cookie"

    def jar(session: requests.Session, base: str) -> list[str]:
        session.get(f"{base}/cookie", stream=True).close()
        return sorted(session.cookies.keys())

    assert both(server, jar) == (["a"], ["a"])
    server.mode = "moved"

    def followed(session: requests.Session, base: str) -> str | None:
        server.requests.clear()
        with session.get(f"{base}/moved", stream=True) as response:
            assert response.history[0].status_code == 302
        landing = server.requests[-1]
        assert landing.target == "/landing"
        return landing.headers.get("cookie")

    assert both(server, followed) == ("r=1", "r=1")


@pytest.mark.parametrize("size", [50_000, 0])
def test_raw_is_a_file_object(server: TestServer, size: int) -> None:
    # 50,000 lines (over 256 KiB) stream unbuffered; an empty body is buffered.
    server.mode = f"lines:{size}"

    def raw(session: requests.Session, base: str) -> tuple[bool, bytes, int]:
        with session.get(f"{base}/lines", stream=True) as response:
            is_file = isinstance(response.raw, io.IOBase)
            with response.raw as body:
                first = next(iter(body))
        with session.get(f"{base}/lines", stream=True) as response:
            count = sum(1 for _ in response.raw)
        return is_file, first, count

    plain, balanced = both(server, raw)
    assert plain == (True, b"line 0\n" if size else b"tail", size + 1)
    assert balanced == plain


def test_a_urllib3_timeout_with_a_total(server: TestServer) -> None:
    def get(session: requests.Session, base: str) -> int:
        return session.get(f"{base}/", timeout=Timeout(connect=2, read=5, total=10)).status_code

    assert both(server, get) == (200, 200)
    assert both(server, lambda s, base: s.get(f"{base}/", timeout=Timeout(total=10)).ok) == (
        True,
        True,
    )
    server.mode = "hang"
    server.hang_seconds = 5.0

    def cut(session: requests.Session, base: str) -> type[BaseException]:
        with pytest.raises(requests.RequestException) as caught:
            session.get(f"{base}/", timeout=Timeout(read=30, total=0.3))
        return type(caught.value)

    assert both(server, cut) == (requests.exceptions.ReadTimeout,) * 2


def test_proxy_credentials_never_reach_a_backend(
    server: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # requests adds Proxy-Authorization to a redirect's request where the environment names a
    # proxy with credentials; the adapter contacts backends directly, so none is for them.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        proxy = f"http://user:secret@127.0.0.1:{unused.getsockname()[1]}"
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.setenv("http_proxy", proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    _, balanced = sessions(server)
    server.mode = "moved"
    with balanced:
        balanced.get("http://users/moved")
    assert [r.target for r in server.requests] == ["/moved", "/landing"]
    assert all("proxy-authorization" not in r.headers for r in server.requests)


class Listener:
    """A loopback listener whose thread hands each connection to :meth:`serve`."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.serve(connection)

    def serve(self, connection: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the thread
        self._listener.close()
        self._thread.join(5)
        assert not self._thread.is_alive()


class BrokenTLS(Listener):
    """A TLS server that reads a whole request, counts it, then writes bytes that are not a
    TLS record on the TCP socket beneath: the client's TLS fails after its request was sent."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.received: list[bytes] = []
        self._context = context
        super().__init__()

    def serve(self, connection: socket.socket) -> None:
        try:
            with self._context.wrap_socket(connection, server_side=True) as tls:
                self.received.append(self._request(tls))
                os.write(tls.fileno(), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (OSError, ValueError):
            connection.close()

    @staticmethod
    def _request(tls: ssl.SSLSocket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            data += tls.recv(65536) or b"\r\n\r\n"
        head, _, body = data.partition(b"\r\n\r\n")
        if b"chunked" in head.lower():
            while not body.endswith(b"0\r\n\r\n"):
                body += tls.recv(65536) or b"0\r\n\r\n"
        else:
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    while len(body) < int(value):
                        body += tls.recv(65536) or b"\0" * int(value)
        return head.split(b"\r\n", 1)[0]


@pytest.fixture
def certs() -> TLSCerts:
    return TLSCerts("users", "127.0.0.1")


@pytest.mark.parametrize("body", ["bytes", "generator"])
def test_a_post_is_not_sent_again_when_tls_breaks_after_it(
    certs: TLSCerts, tmp_path: Path, body: str
) -> None:
    ca = str(certs.write_ca(tmp_path / "ca.pem"))
    first, second = BrokenTLS(certs.server_context()), BrokenTLS(certs.server_context())
    try:

        def content() -> Any:
            return b"pay 100" if body == "bytes" else iter([b"pay ", b"100"])

        with requests.Session() as plain, pytest.raises(requests.exceptions.SSLError):
            plain.post(f"https://{first.address}/orders", data=content(), verify=ca)
        assert first.received == [b"POST /orders HTTP/1.1"]
        first.received.clear()
        adapter = LBAdapter([first.address, second.address], algorithm=RoundRobin)
        with requests.Session() as balanced:
            balanced.mount("https://users/", adapter)
            with pytest.raises(requests.exceptions.SSLError) as caught:
                balanced.post("https://users/orders", data=content(), verify=ca)
        assert len(first.received + second.received) == 1
        assert [a.failure for a in caught.value.attempts] == [Failure.MAYBE_SENT]
    finally:
        first.close()
        second.close()


def test_a_failed_handshake_still_moves_a_post_on(certs: TLSCerts, tmp_path: Path) -> None:
    # Nothing was sent before the handshake failed: another backend may take the POST.
    ca = str(certs.write_ca(tmp_path / "ca.pem"))
    stranger = TLSCerts("someone-else")
    wrong = TestServer(ssl_context=stranger.server_context()).start()
    right = TestServer(ssl_context=certs.server_context()).start()
    try:
        adapter = LBAdapter([wrong.address, right.address], algorithm=RoundRobin)
        with requests.Session() as balanced:
            balanced.mount("https://users/", adapter)
            response = balanced.post("https://users/orders", data=b"pay 100", verify=ca)
        assert response.status_code == 200
        assert right.count("POST") == 1
        assert wrong.count("POST") == 0
    finally:
        wrong.close()
        right.close()


def test_an_empty_body_read_ahead_is_open_until_read(server: TestServer) -> None:
    server.mode = "empty"

    def raw(session: requests.Session, base: str) -> tuple[bool, bytes, bool]:
        with session.get(f"{base}/", stream=True) as response:
            before = response.raw.closed
            with response.raw as body:
                data = body.read()
            return before, data, b"".join(response.iter_content(chunk_size=None)) == b""

    assert both(server, raw) == ((False, b"", True),) * 2


class Hangup(Listener):
    """A listener that reads a client's first bytes (a TLS ClientHello), then ends the
    connection: with a TCP reset (``"reset"``) or a plain close (``"close"``)."""

    def __init__(self, how: str) -> None:
        self.how = how
        super().__init__()

    def serve(self, connection: socket.socket) -> None:
        with connection:
            connection.recv(4096)
            if self.how == "reset":
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("how", ["reset", "close"])
def test_a_handshake_ended_by_the_server_moves_a_post_on(
    certs: TLSCerts, tmp_path: Path, how: str
) -> None:
    # A reset in the TLS handshake reaches urllib3 as "Connection aborted.", not as a TLS
    # error: nothing was sent all the same.
    ca = str(certs.write_ca(tmp_path / "ca.pem"))
    broken = Hangup(how)
    right = TestServer(ssl_context=certs.server_context()).start()
    try:
        with requests.Session() as plain, pytest.raises(requests.ConnectionError):
            plain.post(f"https://{broken.address}/orders", data=b"pay 100", verify=ca)
        adapter = LBAdapter([broken.address, right.address], algorithm=RoundRobin)
        with requests.Session() as balanced:
            balanced.mount("https://users/", adapter)
            for _ in range(2):  # round robin: one of them starts on the broken backend
                response = balanced.post("https://users/orders", data=b"pay 100", verify=ca)
                assert response.status_code == 200
        assert right.count("POST") == 2
    finally:
        broken.close()
        right.close()
