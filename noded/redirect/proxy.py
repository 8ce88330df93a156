"""The listeners inside each captured pod's netns, served by one asyncio loop in the daemon.

15001 (outbound) reads the original destination with SO_ORIGINAL_DST: a meshed destination (noded/tunnel/
node.py decides) gets HBONE to its 15008 with the pod's certificate (the tunnel's client side,
noded/tunnel/outbound.py, dialing from the pod's netns), any other plain TCP from inside the pod on a
socket marked 0x539 (not captured again). 15006 (inbound plaintext, TPROXY) and 15008 (HBONE)
apply the destination pod's AuthorizationPolicies and reach the application from the client's own address
(a transparent bind; its replies come back through the ct mark 0x111 and table 100). 15053 (UDP and TCP)
hands DNS to the resolver (noded/dns), which knows the pod's namespace.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from noded.dns.resolver import Client
from noded.dns.server import serve as serve_dns
from noded.kernel import podns
from noded.loopthread import LoopThread
from noded.redirect.rules import DNS_PORT, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT, TUNNEL_MARK
from noded.tunnel.hbone import ServerConnection, authority, serve
from noded.tunnel.node import Tunnel
from noded.tunnel.outbound import ConnectFrom, HboneClient
from noded.tunnel.relay import Acceptor, finish_connect, spawn, splice_sockets, start_connect
from noded.tunnel.telemetry import UNKNOWN, TcpTelemetry
from noded.waypoint.service import Origin

log = structlog.get_logger("noded.redirect.proxy")

SO_ORIGINAL_DST = 80  # IP6T_SO_ORIGINAL_DST has the same number, at SOL_IPV6
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SO_MARK = 36
DnsHandler = Callable[[bytes, Client], Awaitable[bytes | None]]


def original_dst(sock: socket.socket) -> tuple[str, int]:
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)  # sockaddr_in6
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack(">H", raw[2:4])[0]
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack(">H", raw[2:4])[0]
    return socket.inet_ntoa(raw[4:8]), port


CAPTURE_PORTS = frozenset((OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT, DNS_PORT))


def is_self_call(dst: tuple[str, int]) -> bool:
    """A destination that is one of the pod's own capture listeners (its loopback, or an unspecified
    address, on a capture port): dialing it from the proxy would land on the proxy again, and again, until
    the daemon runs out of file descriptors. ztunnel refuses such self-calls too."""
    try:
        ip = ipaddress.ip_address(dst[0])
    except ValueError:
        return True  # not an address at all: nothing to dial
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return dst[1] in CAPTURE_PORTS and (ip.is_loopback or ip.is_unspecified)


def family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _transparent(sock: socket.socket) -> None:
    """May bind or accept addresses that are not the pod's own (TPROXY, the client's address kept)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


@dataclass
class PodListeners:
    netns: str
    key: tuple[str, str] | None = None  # (namespace, name)
    ips: frozenset[str] = frozenset()  # the pod's own addresses: the only destinations its 15008 dials
    netns_cookie: int = 0  # SO_NETNS_COOKIE of its network namespace
    mesh: bool = False  # enrolled (not only DNS capture): its TCP connects keep their VIP for us
    servers: list[asyncio.base_events.Server] = field(default_factory=list)
    acceptors: list[Acceptor] = field(default_factory=list)
    transports: list[asyncio.BaseTransport] = field(default_factory=list)
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))


class CaptureProxy:
    def __init__(self, dns_handler: DnsHandler, loop: LoopThread, tunnel: Tunnel | None = None) -> None:
        self.dns_handler = dns_handler
        self.tunnel = tunnel
        self.thread = loop
        self.pods: dict[str, PodListeners] = {}
        self.tasks: set[asyncio.Task] = set()
        self.self_calls = 0  # connections refused because they were addressed to a capture listener
        # the tunnel's client side: HBONE connections pooled per pod and peer
        self.hbone = (
            HboneClient(tunnel.telemetry, tunnel.counts, self.tasks, HBONE_PORT) if tunnel is not None else None
        )
        # told when a mesh pod's netns comes and goes (cookie, mesh): the eBPF socket LB leaves its TCP to us
        self.on_mesh_netns: Callable[[int, bool], None] = lambda _cookie, _mesh: None

    def stop(self) -> None:
        for key in list(self.pods):
            self.close_pod(key)

    def open_pod(
        self,
        key: str,
        netns_path: str,
        namespace: str | None = None,
        name: str | None = None,
        ips: list[str] | tuple[str, ...] = (),
        mesh: bool = False,
    ) -> None:
        """Listening sockets in the pod's netns (kept if already open); DNS knows the pod's namespace, the
        tunnel the pod itself and its addresses; `mesh`: enrolled, not only DNS-captured."""
        self.thread.run(self._open(key, netns_path, namespace, name, ips))
        self._set_mesh(key, mesh)

    def _set_mesh(self, key: str, mesh: bool) -> None:
        pod = self.pods.get(key)
        if pod is None or pod.mesh == mesh or not pod.netns_cookie:
            return
        pod.mesh = mesh
        self.on_mesh_netns(pod.netns_cookie, mesh)

    def close_pod(self, key: str) -> bool:
        self._set_mesh(key, False)
        return bool(self.thread.run(self._close(key)))

    def recent(self, key: str) -> list[dict]:
        pod = self.pods.get(key)
        return list(pod.recent) if pod else []

    async def _open(
        self, key: str, netns_path: str, namespace: str | None, name: str | None = None, ips: tuple | list = ()
    ) -> None:
        pod = self.pods.get(key)
        addresses = frozenset(_addresses(ips))
        if pod is not None and pod.netns == netns_path:
            pod.ips = addresses or pod.ips
            return
        if pod is not None:
            await self._close(key)
        pod = PodListeners(netns_path, (namespace, name) if namespace and name else None, addresses)
        socks: dict[str, list[socket.socket]] = {}
        with podns.entered(netns_path):  # the loop's own thread: no other coroutine runs meanwhile
            for loopback, any_address in (("127.0.0.1", "0.0.0.0"), ("::1", "::")):
                try:
                    made = {
                        "outbound": _listener(socket.SOCK_STREAM, loopback, OUTBOUND_PORT),
                        "inbound": _listener(socket.SOCK_STREAM, loopback, INBOUND_PORT, transparent=True),
                        "hbone": _listener(socket.SOCK_STREAM, any_address, HBONE_PORT, transparent=True),
                        "dns-tcp": _listener(socket.SOCK_STREAM, loopback, DNS_PORT),
                        "dns-udp": _listener(socket.SOCK_DGRAM, loopback, DNS_PORT),
                    }
                except OSError:
                    if loopback == "::1":  # a pod without IPv6: IPv4 only
                        break
                    raise
                for name, sock in made.items():
                    socks.setdefault(name, []).append(sock)
                if not pod.netns_cookie:
                    pod.netns_cookie = netns_cookie(made["outbound"])
        handlers = {"outbound": self._outbound, "inbound": self._inbound, "hbone": self._hbone_closed}
        for name, handler in handlers.items():
            for sock in socks[name]:
                if name == "hbone" and self.tunnel and pod.key:  # TLS from the first byte, cert chosen per handshake
                    context = self.tunnel.server_context(pod.key)
                    pod.servers.append(await serve(sock, context, self._hbone_protocol(pod)))
                else:
                    pod.acceptors.append(Acceptor(sock, lambda conn, address, h=handler: h(pod, conn, address)))
        client = Client(namespace=namespace)
        for udp, tcp in zip(socks["dns-udp"], socks["dns-tcp"], strict=True):
            pod.transports += await serve_dns(udp, tcp, self.dns_handler, lambda _peer: client)
        self.pods[key] = pod

    async def _close(self, key: str) -> bool:
        pod = self.pods.pop(key, None)
        if pod is None:
            return False
        if self.hbone is not None:
            self.hbone.drop(pod.netns)
        for server in pod.servers:
            server.close()
        for acceptor in pod.acceptors:
            acceptor.close()
        for transport in pod.transports:
            transport.close()
        return True

    def _local_pod(self, ip: str) -> PodListeners | None:
        """The mesh pod of this node holding `ip`, if one is open here."""
        return next((p for p in self.pods.values() if p.mesh and ip in p.ips), None)

    def _record(self, pod: PodListeners, direction: str, peer: tuple, dst: tuple) -> dict:
        record = {"direction": direction, "peer": f"{peer[0]}:{peer[1]}", "original": f"{dst[0]}:{dst[1]}"}
        record["time"] = time.time()
        pod.recent.append(record)
        return record

    def _pod_socket(self, pod: PodListeners, dst: tuple[str, int], source: str | None = None) -> tuple:
        """A socket connecting from inside the pod's netns, tunnel-marked (not captured again), from `source`
        (a transparent bind: the application sees the client's own address) if given; and whether its
        connect is done already (relay.start_connect)."""
        family = family_of(dst[0])
        with podns.entered(pod.netns):
            up = socket.socket(family, socket.SOCK_STREAM)
        try:
            up.setsockopt(socket.SOL_SOCKET, SO_MARK, TUNNEL_MARK)
            if source is not None:
                _transparent(up)
                up.bind((source, 0))
            up.setblocking(False)
            return up, start_connect(up, dst)
        except BaseException:
            up.close()
            raise

    async def _pod_connected(self, pod: PodListeners, dst: tuple[str, int], source: str | None = None) -> socket.socket:
        """A socket connected from inside the pod's netns (see _pod_socket)."""
        up, connected = self._pod_socket(pod, dst, source)
        if not connected:
            try:
                await finish_connect(up, dst)
            except BaseException:
                up.close()
                raise
        return up

    def _outbound(self, pod: PodListeners, sock: socket.socket, peer: tuple) -> None:
        """15001: where the connection goes; at once (no task) when a pooled HBONE connection takes it."""
        dst = original_dst(sock)
        record = self._record(pod, "outbound", peer, dst)
        if is_self_call(dst):
            self._refuse_self_call(sock, record)
            return
        tunnel = self.tunnel
        route = tunnel.route(*dst) if tunnel and pod.key else None
        try:
            if route is None or route.peer_identity is None:  # not meshed: plain TCP to the endpoint chosen
                if route is not None and route.refused:
                    raise ConnectionRefusedError("service port without endpoints")
                target = (route.ip, route.port) if route is not None else dst
                spawn(self.tasks, self._plain_out(pod, sock, target, record, dst))
                return
            source = tunnel.identity_of(pod.key)
            ctx = tunnel.context(False, source)
            if ctx is None:  # fail closed: a meshed destination never gets plaintext
                raise ConnectionRefusedError(f"no certificate yet for {source}")
        except ConnectionError as e:
            record["error"] = repr(e)
            sock.close()
            return
        waypoint = tunnel.waypoints.target(*dst) if tunnel.waypoints is not None else None
        # through a waypoint: the CONNECT names the Service's VIP:port and the endpoint's node runs the L7 hop
        target = authority(*dst) if waypoint is not None else authority(route.ip, route.port)
        record.update(hbone=authority(route.ip, HBONE_PORT), peer_identity=route.peer_identity, source_identity=source)
        if waypoint is not None:
            record["waypoint"] = f"{waypoint.waypoint.namespace}/{waypoint.waypoint.name}"
        record["telemetry"] = tunnel.telemetry.key(
            "source", tunnel.workload_of(pod.key), tunnel.workload_at(route.ip), tunnel.service_at(*dst), True
        )
        key = (pod.netns, route.ip, route.peer_identity)
        self.hbone.carry(sock, key, ctx, (route.ip, route.peer_identity), target, self._from(pod), record)

    def _refuse_self_call(self, sock: socket.socket, record: dict) -> None:
        record["error"] = "self-call refused"
        self.self_calls += 1
        if self.self_calls & (self.self_calls - 1) == 0:  # the 1st, 2nd, 4th, ...: a flood is not a log flood
            log.warning(
                "self-call to a capture listener refused",
                original=record["original"],
                peer=record["peer"],
                total=self.self_calls,
            )
        sock.close()

    async def _plain_out(
        self, pod: PodListeners, sock: socket.socket, dst: tuple, record: dict, asked: tuple | None = None
    ) -> None:
        """Plain TCP to `dst` (the endpoint chosen for the address the pod `asked` for, or that address)."""
        asked = asked or dst
        try:
            up = await self._pod_connected(pod, dst)
        except (TimeoutError, OSError, podns.CaptureError) as e:
            record["error"] = repr(e)
            sock.close()
            return
        tunnel = self.tunnel
        if not tunnel:
            await splice_sockets(sock, up)
            return
        tunnel.counts["plain_out"] += 1
        key = tunnel.telemetry.key(
            "source", tunnel.workload_of(pod.key), tunnel.workload_at(dst[0]), tunnel.service_at(*asked[:2]), False
        )
        await counted_splice(tunnel.telemetry, key, sock, up)

    def _inbound(self, pod: PodListeners, sock: socket.socket, peer: tuple) -> None:
        """Plaintext to an enrolled pod (TPROXY to 15006): the same policy, without a principal."""
        dst = sock.getsockname()[:2]
        record = self._record(pod, "inbound", peer, dst)
        if is_self_call(dst):
            self._refuse_self_call(sock, record)
            return
        if self.tunnel and pod.key:
            if not self.tunnel.authorize(pod.key, None, peer[0], dst[0], dst[1]):
                record["error"] = "denied by policy"
                sock.close()
                return
            self.tunnel.counts["plain_in"] += 1

        async def splice() -> None:
            tunnel = self.tunnel
            try:
                up = await self._pod_connected(pod, dst, source=peer[0] if tunnel else None)
            except (TimeoutError, OSError, podns.CaptureError) as e:
                record["error"] = repr(e)
                sock.close()
                return
            if not (tunnel and pod.key):
                await splice_sockets(sock, up)
                return
            # plaintext: the source's principal is not known (Istio's "unknown"), its workload by address
            source = dataclasses.replace(tunnel.workload_at(peer[0]), principal=UNKNOWN)
            key = tunnel.telemetry.key("destination", source, tunnel.workload_of(pod.key), None, False)
            await counted_splice(tunnel.telemetry, key, sock, up)

        spawn(self.tasks, splice())

    def _hbone_closed(self, pod: PodListeners, sock: socket.socket, peer: tuple) -> None:
        sock.close()  # no tunnel for this pod: nothing listens on 15008 in its name

    def _hbone_protocol(self, pod: PodListeners) -> Callable[[], ServerConnection]:
        """HBONE to this pod (15008), the mTLS handshake done: policy, then the app, client address kept."""
        tunnel = self.tunnel

        def connected(transport: asyncio.BaseTransport, identity: str) -> None:
            peer = transport.get_extra_info("peername")
            record = self._record(pod, "hbone", peer, transport.get_extra_info("sockname")[:2])
            record["peer_identity"] = identity
            tunnel.counts["hbone_in"] += 1

        def authorize(identity: str, peer: tuple, host: str, port: int) -> bool:
            if tunnel.waypoints is not None and tunnel.waypoints.target(host, port) is not None:
                return True  # the waypoint decides each request (L7 policy with this identity)
            return tunnel.authorize(pod.key, identity, peer[0], host, port)

        def dial(identity: str, peer: tuple, host: str, port: int) -> tuple:
            target = tunnel.waypoints.target(host, port) if tunnel.waypoints is not None else None
            if target is not None:
                origin = Origin(lambda as_identity, to, factory: self._waypoint_dial(pod, as_identity, to, factory))
                accepted = tunnel.waypoints.accept(target, peer[0], identity, origin)
                if accepted is None:
                    raise ConnectionRefusedError("the waypoint is at its connection limit")
                return accepted, True
            return self._pod_socket(pod, (host, port), peer[0])

        def serves(host: str, port: int) -> bool:  # this pod's own addresses only, never a capture port
            if tunnel.waypoints is not None and tunnel.waypoints.target(host, port) is not None:
                return True  # a Service VIP:port through the waypoint, which runs here
            info = tunnel.enrollment.pod(pod.key) if pod.key else None
            own = pod.ips or frozenset(_addresses(info.ips if info else ()))  # as CNI reported, else the API
            return host in own and port not in CAPTURE_PORTS

        def on_stream(identity: str, peer: tuple, _host: str, _port: int) -> Callable[[int, int], None]:
            source = dataclasses.replace(tunnel.workload_at(peer[0]), principal=identity)
            key = tunnel.telemetry.open(
                tunnel.telemetry.key("destination", source, tunnel.workload_of(pod.key), None, True)
            )
            return lambda request, response: tunnel.telemetry.close(key, request, response)

        def factory() -> ServerConnection:
            conn = ServerConnection(tunnel.trust_domain, authorize, None, connected, serves, on_stream)
            conn.dial = lambda peer, host, port: dial(conn.identity, peer, host, port)
            return conn

        return factory

    async def _waypoint_dial(
        self, pod: PodListeners, identity: str, address: tuple[str, int], factory: Callable[[], asyncio.Protocol]
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        """A connection from the waypoint to a backend, from the pod whose 15008 took the client's, as the
        waypoint's identity: to a mesh pod of this node, its L4 policy decided here and the app dialed in its
        netns (no TLS to itself; the app sees the accepting pod's address, as over HBONE); to a meshed backend
        elsewhere, HBONE (pooled like the pods' own); to any other, plain TCP; `factory`'s protocol over it."""
        tunnel = self.tunnel
        loop = asyncio.get_running_loop()
        local = self._local_pod(address[0])
        if local is not None and local.key:  # a pod of this node: its L4 policy here, then straight in
            if not tunnel.authorize(local.key, identity, _first_ip(pod, address[0]), address[0], address[1]):
                raise ConnectionRefusedError(f"{identity} denied by {local.key[0]}/{local.key[1]}'s policy")
            source = None if local is pod else _first_ip(pod, address[0])
            up = await self._pod_connected(local, address, source)
            return await loop.create_connection(factory, sock=up)
        route = tunnel.route(*address)
        if route.peer_identity is None:
            up = await self._pod_connected(pod, address)
            return await loop.create_connection(factory, sock=up)
        ctx = tunnel.context(False, identity)
        if ctx is None:  # fail closed: no certificate for the waypoint yet, no plaintext either
            raise ConnectionRefusedError(f"no certificate yet for {identity}")

        key = (pod.netns, route.ip, route.peer_identity, identity)
        peer, target = (route.ip, route.peer_identity), authority(route.ip, route.port)
        theirs = await self.hbone.socket_to(key, ctx, peer, target, self._from(pod))
        return await loop.create_connection(factory, sock=theirs)

    def _from(self, pod: PodListeners) -> ConnectFrom:
        """Connections made from inside the pod's netns (an OSError when it cannot be entered)."""

        async def connect_from(address: tuple[str, int]) -> socket.socket:
            try:
                return await self._pod_connected(pod, address)
            except podns.CaptureError as e:
                raise ConnectionRefusedError(f"pod netns not usable: {e}") from e

        return connect_from


async def counted_splice(
    telemetry: TcpTelemetry, key: tuple[str, ...], client: socket.socket, up: socket.socket
) -> None:
    """splice_sockets, the connection counted as opened and, with its bytes each way, as closed."""
    key = telemetry.open(key)
    request, response = 0, 0
    try:
        request, response = await splice_sockets(client, up)
    finally:
        telemetry.close(key, request, response)


SO_NETNS_COOKIE = 71


def _first_ip(pod: PodListeners, like: str) -> str | None:
    """The pod's own address of the same family as `like` (what its sockets would come from)."""
    v6 = ":" in like
    return next((ip for ip in sorted(pod.ips) if (":" in ip) == v6), None)


def netns_cookie(sock: socket.socket) -> int:
    """The cookie of the network namespace a socket was made in (what bpf_get_netns_cookie returns)."""
    try:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    except OSError:
        return 0


def _addresses(ips: object) -> list[str]:
    """The pod's addresses as noded-cni reported them, normalised; anything else left out."""
    out = []
    for ip in ips if isinstance(ips, list | tuple) else ():
        try:
            out.append(str(ipaddress.ip_address(str(ip).split("/")[0])))
        except ValueError:
            continue
    return out


def _listener(kind: int, host: str, port: int, transparent: bool = False) -> socket.socket:
    family = family_of(host)
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # IPv4 has its own listener
    if transparent:
        _transparent(s)
    s.bind((host, port))
    if kind == socket.SOCK_STREAM:
        s.listen(128)
    s.setblocking(False)
    return s
