"""Kubernetes discovery's reading, with plain values: slices to backends, events to changes,
credentials, and the checks of the user's input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lbclient import Backend
from lbclient.discovery import Kubernetes
from lbclient.discovery._kube_api import resolve, slice_backends, slices_path
from lbclient.discovery._watch import Relist, StreamBroken
from lbclient.testing import KubernetesAPI

E, P = KubernetesAPI.endpoint, KubernetesAPI.port


def _slice(endpoints: list[dict[str, object]], **extra: object) -> dict[str, object]:
    return {
        "metadata": {"name": "web-abc", "resourceVersion": "7"},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [P(8080, "http"), P(9090, "metrics")],
        **extra,
    }


def test_conditions_decide_who_takes_new_requests() -> None:
    facts = slice_backends(
        _slice(
            [
                E("10.0.0.1"),  # ready
                E("10.0.0.2", ready=False, serving=True, terminating=True),  # draining
                E("10.0.0.3", ready=False, serving=False, terminating=True),  # gone
                E("10.0.0.4", ready=False),  # not ready yet
                {"addresses": ["10.0.0.5"], "conditions": {}},  # unknown reads as ready
            ]
        ),
        "http",
    )
    assert [b.address for b in facts.backends] == ["10.0.0.1:8080", "10.0.0.5:8080"]
    assert facts.draining == 1
    assert facts.skipped == ()


def test_zone_and_node_go_into_metadata_and_ports_by_name_or_number() -> None:
    obj = _slice([E("10.0.0.1", zone="eu-1a", node="node-7")])
    (by_name,) = slice_backends(obj, "metrics").backends
    assert by_name.address == "10.0.0.1:9090"
    assert dict(by_name.metadata) == {"zone": "eu-1a", "node": "node-7"}
    assert slice_backends(obj, 8080).backends[0].address == "10.0.0.1:8080"
    with pytest.raises(ValueError, match="no port 'grpc'"):
        slice_backends(obj, "grpc")
    with pytest.raises(ValueError, match="say which with port="):
        slice_backends(obj, None)


def test_ipv6_slices_are_bracketed_and_bad_addresses_skipped() -> None:
    obj = _slice([E("fd00::1"), E("fd00:0:0::2"), E("not an ip")], addressType="IPv6")
    facts = slice_backends(obj, "http")
    assert [b.address for b in facts.backends] == ["[fd00::1]:8080", "[fd00::2]:8080"]
    assert len(facts.skipped) == 1
    assert "web-abc" in facts.skipped[0]


def test_unreadable_slices_are_named() -> None:
    with pytest.raises(ValueError, match="addressType 'IPX'"):
        slice_backends(_slice([E("10.0.0.1")], addressType="IPX"), "http")
    with pytest.raises(ValueError, match="JSON object"):
        slice_backends(["x"], "http")
    assert slice_backends(_slice([], ports=None), "http").backends == ()


def _source(tmp_path: Path, **options: object) -> Kubernetes:
    return Kubernetes(
        "web", server="http://127.0.0.1:1", service_account=tmp_path, port="http", **options
    )


def test_events_become_changes(tmp_path: Path) -> None:
    source = _source(tmp_path)
    change = source.message({"type": "ADDED", "object": _slice([E("10.0.0.1")])})
    assert change.put == {"web-abc": (Backend("10.0.0.1:8080"),)}
    assert change.revision == "7"
    deleted = source.message({"type": "DELETED", "object": _slice([])})
    assert deleted.deleted == ("web-abc",)
    bookmark = source.message(
        {
            "type": "BOOKMARK",
            "object": {"kind": "EndpointSlice", "metadata": {"resourceVersion": "9"}},
        }
    )
    assert bookmark.revision == "9"
    assert bookmark.events == 0
    broken = source.message({"type": "MODIFIED", "object": _slice([E("10.0.0.1")], ports=[])})
    assert broken.put == {"web-abc": ()}
    assert broken.skipped == 1
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}
    with pytest.raises(Relist, match="too old"):
        source.message(gone)
    with pytest.raises(StreamBroken, match="500"):
        source.message({"type": "ERROR", "object": {"code": 500, "message": "boom"}})
    for garbage, why in (
        ([1], "not a watch event"),
        ({"type": "ADDED"}, "not a watch event"),
        ({"type": "WHAT", "object": _slice([])}, "of type 'WHAT'"),
    ):
        with pytest.raises(ValueError, match=why):
            source.message(garbage)


@pytest.mark.parametrize(
    ("options", "error", "text"),
    [
        ({"service": ""}, ValueError, "empty string"),
        ({"service": "Web_1"}, ValueError, "'Web_1' is not a Service's name"),
        ({"namespace": "team/a"}, ValueError, "'team/a' has a '/'"),
        ({"namespace": ""}, ValueError, "namespace '' is not"),
        ({"port": 0}, ValueError, "port 0 is outside"),
        ({"port": "HTTP!"}, ValueError, "'HTTP!' is not a port's name"),
        ({"port": 1.5}, TypeError, "port must be"),
        ({"server": "10.96.0.1:443"}, ValueError, "not an http(s) URL"),
        ({"watch_timeout": 0}, ValueError, "watch_timeout"),
    ],
)
def test_bad_input_is_named(
    tmp_path: Path, options: dict[str, object], error: type[Exception], text: str
) -> None:
    given: dict[str, object] = {"service": "web", "server": "http://127.0.0.1:1", **options}
    service = given.pop("service")
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        Kubernetes(service, service_account=tmp_path, **given)  # type: ignore[arg-type]


def test_inside_a_pod_the_service_account_is_used(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t-1\n")
    (tmp_path / "ca.crt").write_text("")
    (tmp_path / "namespace").write_text("team-a\n")
    env = {"KUBERNETES_SERVICE_HOST": "fd00::10", "KUBERNETES_SERVICE_PORT": "6443"}
    found, namespace = resolve(service_account=tmp_path, environ=env)
    assert found.server == "https://[fd00::10]:6443"
    assert found.origin == "pod"
    assert namespace == "team-a"
    assert found.ca_file == str(tmp_path / "ca.crt")
    assert found.headers() == {"Authorization": "Bearer t-1"}
    (tmp_path / "token").write_text("t-2")  # the kubelet rotates it: read again
    assert found.headers() == {"Authorization": "Bearer t-2"}
    given, namespace = resolve(
        server="http://127.0.0.1:8001",
        token_file=tmp_path / "other",
        namespace="prod",
        service_account=tmp_path,
        environ=env,
    )
    assert given.server == "http://127.0.0.1:8001"
    assert given.origin == "given"
    assert namespace == "prod"
    assert given.ca_file is None
    with pytest.raises(OSError, match="cannot read the Kubernetes token file"):
        given.headers()
    assert slices_path("prod", "web").endswith("labelSelector=kubernetes.io%2Fservice-name%3Dweb")
    # A plain-http server given without a token file (kubectl proxy, say) gets no pod token.
    proxy, _ = resolve(server="http://127.0.0.1:8001", service_account=tmp_path, environ=env)
    assert proxy.headers() == {}
    secure, _ = resolve(server="https://10.0.0.9:6443", service_account=tmp_path, environ=env)
    assert secure.headers() == {"Authorization": "Bearer t-2"}


def test_outside_a_pod_without_the_client_says_which_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "kubernetes.client", None)
    with pytest.raises(RuntimeError, match=r"pip install 'lbclient\[kubernetes\]'"):
        resolve(service_account=tmp_path, environ={})
