"""A local HTTP server speaking the Kubernetes list/watch protocol, for testing the API source.

Lists with limit/continue pagination and a resourceVersion; watches stream
chunked JSON events after a resourceVersion, send BOOKMARKs on request, answer
410 Gone (as an ERROR event, like kube-apiserver) for compacted versions, and
can drop every open watch or stop answering altogether. With `tls` (a server certificate and key) it
speaks HTTPS, and with `token` it answers 401 to a request without that bearer token, as the API server
does; `fail(path, status, times, headers)` makes the next requests to a path fail with that status (403,
429 with Retry-After, 500...), and `delay` holds answers back (timeouts).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import datetime
import ipaddress
import json
import pathlib
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pyroute2.netns import popns, pushns

PATHS = {
    "/api/v1/services": ("Service", "v1", "ServiceList"),
    "/apis/discovery.k8s.io/v1/endpointslices": ("EndpointSlice", "discovery.k8s.io/v1", "EndpointSliceList"),
    "/api/v1/nodes": ("Node", "v1", "NodeList"),
    "/api/v1/pods": ("Pod", "v1", "PodList"),
    "/api/v1/namespaces": ("Namespace", "v1", "NamespaceList"),
    "/apis/security.istio.io/v1/authorizationpolicies": (
        "AuthorizationPolicy",
        "security.istio.io/v1",
        "AuthorizationPolicyList",
    ),
    "/apis/gateway.networking.k8s.io/v1/gateways": ("Gateway", "gateway.networking.k8s.io/v1", "GatewayList"),
    "/apis/gateway.networking.k8s.io/v1/httproutes": ("HTTPRoute", "gateway.networking.k8s.io/v1", "HTTPRouteList"),
}


def _selected(obj: dict, q: dict) -> bool:
    """The field selectors the daemon uses: metadata.name=NAME (its Node), spec.nodeName=NAME (its Pods)."""
    field, _, value = q.get("fieldSelector", "").partition("=")
    if field == "metadata.name":
        return obj["metadata"]["name"] == value
    if field == "spec.nodeName":
        return (obj.get("spec") or {}).get("nodeName") == value
    return True


class FakeApiServer:
    def __init__(
        self,
        netns_name: str | None = None,
        tls: tuple[str, str] | None = None,
        token: str | None = None,
        client_ca: str | None = None,
    ) -> None:
        self.netns_name = netns_name  # listen on loopback inside this network namespace
        self.tls = tls  # (cert file, key file): HTTPS
        self.client_ca = client_ca  # with tls: a client certificate signed by this CA is required
        self.token = token  # required as "Authorization: Bearer <token>"
        self.failures: dict[str, list[tuple[int, dict[str, str]]]] = {}  # path -> statuses to answer next
        self.delay = 0.0
        self.hidden: set[str] = set()  # paths answered 404, as for a CRD that is not installed
        self.rv = 100
        self.objects: dict[str, dict[tuple[str, str], dict]] = {p: {} for p in PATHS}
        self.events: dict[str, list[tuple[int, str, dict]]] = {p: [] for p in PATHS}
        self.compacted = 0
        self.cond = threading.Condition()
        self.watch_conns: list[socket.socket] = []
        self.requests: list[str] = []
        # (verb, API group, resource, namespace, name), as RBAC sees them ("" where the request has none)
        self.calls: set[tuple[str, str, str, str, str]] = set()
        self.daemonsets: dict[tuple[str, str], dict] = {}  # read one at a time (GET), never listed
        # bytes of list and watch bodies sent, by (path, fieldSelector): what each kind of client costs
        self.bytes_sent: collections.Counter[tuple[str, str]] = collections.Counter()
        # (path, field selector, label selector) -> (rv, the objects selected, sorted by key): big lists
        self._sorted: dict[tuple[str, str, str], tuple[int, list]] = {}
        self._server: ThreadingHTTPServer | None = None
        self.port = 0

    # -- control ----------------------------------------------------------------------
    def start(self, port: int = 0) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fake._handle(self)

            def log_message(self, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        if self.netns_name:
            pushns(self.netns_name)  # this thread only, while the listening socket is made
        try:
            self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        finally:
            if self.netns_name:
                popns()
        self._server.daemon_threads = True
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            if self.client_ca:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(self.client_ca)
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop answering (the API server is gone); open watches are cut."""
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.drop_watches()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def fail(self, path: str, status: int, times: int = 1, headers: dict[str, str] | None = None) -> None:
        with self.cond:
            self.failures.setdefault(path, []).extend([(status, headers or {})] * times)

    def _path(self, kind: str) -> str:
        return next(p for p, (k, _a, _l) in PATHS.items() if k == kind)

    def put(self, obj: dict) -> None:
        path = self._path(obj["kind"])
        with self.cond:
            self.rv += 1
            meta = obj.setdefault("metadata", {})
            meta["resourceVersion"] = str(self.rv)
            key = (meta.get("namespace", "default"), meta["name"])
            etype = "MODIFIED" if key in self.objects[path] else "ADDED"
            self.objects[path][key] = obj
            self.events[path].append((self.rv, etype, json.loads(json.dumps(obj))))
            self.cond.notify_all()

    def load(self, objects: list[dict]) -> None:
        """Objects that exist before any client lists (no watch event each: a big cluster, quickly)."""
        with self.cond:
            for obj in objects:
                self.rv += 1
                meta = obj.setdefault("metadata", {})
                meta["resourceVersion"] = str(self.rv)
                self.objects[self._path(obj["kind"])][(meta.get("namespace", "default"), meta["name"])] = obj

    def remove(self, kind: str, namespace: str, name: str) -> None:
        path = self._path(kind)
        with self.cond:
            self.rv += 1
            obj = self.objects[path].pop((namespace, name))
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.events[path].append((self.rv, "DELETED", obj))
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget history: watches from older versions get 410 Gone."""
        with self.cond:
            self.compacted = self.rv
            for p in self.events:
                self.events[p] = []

    def bookmark(self) -> None:
        with self.cond:
            self.rv += 1
            for p in self.events:
                self.events[p].append((self.rv, "BOOKMARK", {}))
            self.cond.notify_all()

    def drop_watches(self) -> None:
        with self.cond:
            for conn in self.watch_conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self.watch_conns.clear()
            self.cond.notify_all()

    # -- protocol -----------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.requests.append(h.path)
        # api/v1/[namespaces/NS/]RES[/NAME] or apis/GROUP/VERSION/[namespaces/NS/]RES[/NAME]
        parts = url.path.strip("/").split("/")
        group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1] if len(parts) > 1 else "", parts[3:])
        namespace = ""
        if rest[:1] == ["namespaces"] and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        resource, name = [*rest, "", ""][:2]
        verb = "get" if name else "watch" if q.get("watch") in ("true", "1") else "list"
        self.calls.add((verb, group, resource, namespace, name))
        if self.delay:
            time.sleep(self.delay)
        scheme, _, token = (h.headers.get("Authorization") or "").partition(" ")
        if self.token is not None and (scheme.lower() != "bearer" or token != self.token):  # as kube-apiserver
            self._json(h, 401, {"kind": "Status", "code": 401, "reason": "Unauthorized", "message": "Unauthorized"})
            return
        with self.cond:
            failing = self.failures.get(url.path)
            failure = failing.pop(0) if failing else None
        if failure is not None:
            status, headers = failure
            self._json(h, status, {"kind": "Status", "code": status, "message": f"injected {status}"}, headers)
            return
        if (group, resource) == ("apps", "daemonsets") and name:
            with self.cond:
                ds = self.daemonsets.get((namespace, name))
            if ds is None:
                self._json(h, 404, {"kind": "Status", "code": 404, "reason": "NotFound", "message": "not found"})
            else:
                self._json(h, 200, ds)
        elif url.path not in PATHS or url.path in self.hidden:
            self._json(h, 404, {"kind": "Status", "code": 404, "message": "not found"})
        elif q.get("watch") in ("true", "1"):
            self._watch(h, url.path, q)
        else:
            self._list(h, url.path, q)

    def _json(self, h: BaseHTTPRequestHandler, code: int, body: dict, headers: dict | None = None) -> int:
        data = json.dumps(body).encode()
        h.send_response(code)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
        return len(data)

    def _list(self, h: BaseHTTPRequestHandler, path: str, q: dict) -> None:
        _kind, api_version, list_kind = PATHS[path]
        with self.cond:
            rv = self.rv
            # a paginated list of a big kind is sorted and filtered once per version, not per page
            selection = (path, q.get("fieldSelector", ""), q.get("labelSelector", ""))
            held = self._sorted.get(selection)
            if held is None or held[0] != rv:
                ordered = sorted(self.objects[path].items(), key=lambda item: item[0])
                held = self._sorted[selection] = (rv, [(k, o) for k, o in ordered if _selected(o, q)])
            items = held[1]
        start = int(q.get("continue") or 0)
        limit = int(q.get("limit") or 0) or len(items)
        page = [obj for _k, obj in items[start : start + limit]]
        meta: dict = {"resourceVersion": str(rv)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
            meta["remainingItemCount"] = len(items) - start - limit  # as the API server sends with a limit
        # Items in a list carry no kind, as the real API server's don't.
        stripped = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in page]
        body = {"kind": list_kind, "apiVersion": api_version, "metadata": meta, "items": stripped}
        self.bytes_sent[(path, q.get("fieldSelector", ""))] += self._json(h, 200, body)

    def _watch(self, h: BaseHTTPRequestHandler, path: str, q: dict) -> None:
        since = int(q.get("resourceVersion") or 0)
        bookmarks = q.get("allowWatchBookmarks") == "true"
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        counted = (path, q.get("fieldSelector", ""))

        def send(event: dict) -> None:
            data = (json.dumps(event) + "\n").encode()
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()
            self.bytes_sent[counted] += len(data)

        with self.cond:
            self.watch_conns.append(h.connection)
        try:
            if since and since < self.compacted:
                send(
                    {
                        "type": "ERROR",
                        "object": {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "status": "Failure",
                            "message": f"too old resource version: {since}",
                            "reason": "Expired",
                            "code": 410,
                        },
                    }
                )
                h.wfile.write(b"0\r\n\r\n")
                return
            sent = since
            while True:
                with self.cond:
                    events = self.events[path]  # in resourceVersion order
                    pending = events[bisect.bisect_right(events, sent, key=lambda e: e[0]) :]
                    if not pending:
                        if h.connection not in self.watch_conns:
                            return
                        self.cond.wait(0.5)
                        continue
                for rv, etype, obj in pending:
                    sent = rv
                    if etype == "BOOKMARK":
                        if bookmarks:
                            kind, api_version, _ = PATHS[path]
                            send(
                                {
                                    "type": "BOOKMARK",
                                    "object": {
                                        "kind": kind,
                                        "apiVersion": api_version,
                                        "metadata": {"resourceVersion": str(rv)},
                                    },
                                }
                            )
                        continue
                    if _selected(obj, q):
                        send({"type": etype, "object": obj})
        except OSError:
            return
        finally:
            with self.cond:
                if h.connection in self.watch_conns:
                    self.watch_conns.remove(h.connection)


def serving_cert(directory: pathlib.Path) -> tuple[str, str, str]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca file, cert file, key file)."""
    return _signed(directory, "server", "kube-apiserver", "test-apiserver-ca")


def client_cert(directory: pathlib.Path) -> tuple[str, str, str]:
    """A client CA and a client certificate signed by it (a user of group noded:nodes, as kubeadm makes them):
    (ca file, cert file, key file)."""
    return _signed(directory, "client", "noded:node:n1", "test-client-ca")


def _signed(directory: pathlib.Path, role: str, subject: str, ca_subject: str) -> tuple[str, str, str]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_subject)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if role == "server":
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(san, False)
    cert = builder.sign(ca_key, hashes.SHA256())
    ca_file = "ca.crt" if role == "server" else f"{role}-ca.crt"
    paths = [directory / ca_file, directory / f"{role}.crt", directory / f"{role}.key"]
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tuple(str(p) for p in paths)
