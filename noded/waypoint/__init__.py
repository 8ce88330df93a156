"""The waypoint: Istio ambient's L7 hop for a namespace, as a function of the daemon (no pod).

`registry` owns what users write to enrol services (Gateway `istio-waypoint`, the `istio.io/use-waypoint`
labels, appProtocol and port names) and their HTTPRoutes (`routes`); `http1` is the HTTP/1.1 proxy (and
`http2` its HTTP/2 side, for h2c and gRPC) that applies L7 AuthorizationPolicy (noded/tunnel/policy.py),
the routes, request IDs and per-request telemetry (`telemetry`); `service` ties it to the tunnel: where
connections come in and how each request reaches its backend.

Where it runs: on the node of the endpoint the client's node picked, in that pod's HBONE listener (a
CONNECT naming the Service's VIP:port instead of a pod address says "through the waypoint"). The
destination side, as in Istio: the client's node cannot skip the policy, and each node carries the L7 work
of the requests it serves. Requests then reach the backend the route picks over HBONE with the waypoint's
own identity (`spiffe://<td>/ns/<ns>/sa/<gateway name>`, as Istio's waypoint pod's service account), so the
destination's L4 policies see the waypoint, exactly as with Istio.
"""
