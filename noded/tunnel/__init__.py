"""The node tunnel: workload identities (SPIFFE: ca.py, certs.py, caservice.py, service.py), mTLS (tls.py),
HBONE (HTTP/2 framing in frames.py over noded/h2wire.py; the input side sans I/O in h2input.py; the
connection, its asyncio adapter, and its streams in h2conn.py; the CONNECT server side and
the pool in hbone.py; the client side of a pod's connection in outbound.py; splicing in relay.py), the
tunnel's decisions (node.py), L4/L7 AuthorizationPolicy (policy.py), telemetry, and other nodes' pods
(workloads.py)."""
