"""A lab HTTP client run inside a pod: `count` requests on one kept-alive connection (a new one after the
server closes), printing one JSON line: [{status, body (JSON when it is), headers}...], or {"error": ...}.
`--raw DATA` sends those bytes instead and prints what came back until the server closed (garbage tests);
`--websocket` upgrades and sends a line, printing the status and what came back. A name is resolved with the
pod's search path against `--dns` (the node-local DNS), never the machine's own resolver; the Host header
keeps the name, as curl sends it."""

from __future__ import annotations

import argparse
import http.client
import json
import socket


def resolve(name: str, server: str, namespace: str) -> str:
    """The address of `name` as a pod in `namespace` resolves it (its search path), from `server` only."""
    import ipaddress

    import dns.message
    import dns.query

    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    for suffix in (f"{namespace}.svc.cluster.local", "svc.cluster.local", "cluster.local", ""):
        query = dns.message.make_query(f"{name}.{suffix}".rstrip(".") + ".", "A")
        reply = dns.query.udp(query, server, timeout=3)
        for rrset in reply.answer:
            for rdata in rrset:
                if hasattr(rdata, "address"):
                    return rdata.address
    raise OSError(f"{name}: no address from {server}")


def requests(
    host: str, address: str, port: int, method: str, path: str, count: int, body: str, headers: list[str]
) -> list[dict]:
    extra = dict(h.split(":", 1) for h in headers)
    extra = {"Host": host, **{k.strip(): v.strip() for k, v in extra.items()}}
    host = address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    out = []
    for _ in range(count):
        try:
            conn.request(method, path, body=body.encode() if body else None, headers=extra)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            out.append({"error": f"{type(e).__name__}: {e}"})
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=10)
            continue
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = data.decode(errors="replace")
        out.append({"status": resp.status, "body": parsed, "headers": dict(resp.getheaders())})
        if resp.will_close:
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.close()
    return out


def raw(host: str, port: int, data: bytes) -> dict:
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return {"raw": got.decode(errors="replace")}


def websocket(host: str, port: int, path: str) -> dict:
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
        rest = head.partition(b"\r\n\r\n")[2]
        s.sendall(b"hello through the waypoint\n")
        while len(rest) < 27:
            chunk = s.recv(4096)
            if not chunk:
                break
            rest += chunk
    return {"status": status, "echoed": rest.decode(errors="replace")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--path", default="/")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--body", default="")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--raw")
    parser.add_argument("--websocket", action="store_true")
    parser.add_argument("--dns", default="169.254.20.10", help="the DNS server names are resolved with")
    parser.add_argument("--namespace", default="default", help="the pod's namespace (its search path)")
    args = parser.parse_args()
    try:
        address = resolve(args.host, args.dns, args.namespace)
        if args.raw is not None:
            out: object = raw(address, args.port, args.raw.encode().decode("unicode_escape").encode("latin-1"))
        elif args.websocket:
            out = websocket(address, args.port, args.path)
        else:
            out = requests(args.host, address, args.port, args.method, args.path, args.count, args.body, args.header)
    except OSError as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
