"""A tiny lab workload: answers each TCP line and each UDP datagram with its own name.

A `peer` message is answered with the name and the client address the server saw; HTTP GETs get an
HTTP response with the name as body, so `curl` works too; a datagram that is a DNS query gets a DNS answer
(TXT: the name), so the same pod plays a DNS server of its own.
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import threading


def serve(name: str, tcp_port: int, udp_port: int) -> None:
    reply = f"{name}\n".encode()

    def answer(message: bytes, client: str) -> bytes:
        dns_reply = _dns_answer(message, name)
        if dns_reply is not None:
            return dns_reply
        if message.strip() == b"peer":
            return f"{name} {client.removeprefix('::ffff:')}\n".encode()
        return reply

    class Tcp(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                if line.startswith(b"GET "):
                    while self.rfile.readline().strip():
                        pass
                    self.wfile.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(reply), reply)
                    )
                    return
                self.wfile.write(answer(line, self.client_address[0]))

    class Udp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            sock.sendto(answer(data, self.client_address[0]), self.client_address)

    class TcpServer(socketserver.ThreadingTCPServer):
        address_family = socket.AF_INET6  # dual-stack: IPv4 clients arrive as mapped addresses
        allow_reuse_address = True
        daemon_threads = True

    class UdpServer(socketserver.UDPServer):
        address_family = socket.AF_INET6

    servers: list[socketserver.BaseServer] = [TcpServer(("::", tcp_port), Tcp)]
    if udp_port:
        servers.append(UdpServer(("::", udp_port), Udp))
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    print(f"{name} serving tcp/{tcp_port} udp/{udp_port}", flush=True)
    threading.Event().wait()


def _dns_answer(message: bytes, name: str) -> bytes | None:
    if len(message) < 12 or message[2] & 0x80:  # too short, or not a query
        return None
    import dns.exception
    import dns.message
    import dns.rrset

    try:
        query = dns.message.from_wire(message)
    except (dns.exception.DNSException, ValueError):
        return None
    if not query.question:
        return None
    reply = dns.message.make_response(query)
    reply.answer.append(dns.rrset.from_text(query.question[0].name, 5, "IN", "TXT", f'"{name}"'))
    return reply.to_wire()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", default=socket.gethostname())
    p.add_argument("--tcp", type=int, default=8080)
    p.add_argument("--udp", type=int, default=0)
    args = p.parse_args()
    serve(args.name, args.tcp, args.udp)


if __name__ == "__main__":
    main()
