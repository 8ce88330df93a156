"""The traffic graph (what Kiali draws for Istio users): workloads and services as nodes, the connections
the tunnel saw as edges, with counts, bytes, mTLS or plaintext, and denied edges.

`snapshot()` turns one node's TCP telemetry into graph JSON; `merge()` joins every node's (the lab-wide
view) without counting a connection twice: a connection between two captured pods is reported by both
ends, so an edge reported by its destination wins and the source's report is used only where no
destination reported (a destination outside the mesh). `PAGE` is the self-contained page (no CDN: nodes
are offline) that fetches `graph.json` every two seconds and draws it as SVG, rates computed from the
change between two fetches. Pure, but for the page's own JavaScript.
"""

from __future__ import annotations

import time
from typing import Any

from noded.tunnel.telemetry import LABELS, UNKNOWN, TcpTelemetry

_AT = {name: i for i, name in enumerate(LABELS)}
COUNTS = ("opened", "closed", "requestBytes", "responseBytes", "denied")


def _workload(namespace: str, name: str) -> str:
    return f"{namespace}/{name}" if name != UNKNOWN else "unknown"


def snapshot(telemetry: TcpTelemetry, node: str) -> dict[str, Any]:
    edges: list[dict[str, Any]] = []
    for key, opened in list(telemetry.opened.items()):
        get = key.__getitem__
        source = _workload(get(_AT["source_workload_namespace"]), get(_AT["source_workload"]))
        target = _workload(get(_AT["destination_workload_namespace"]), get(_AT["destination_workload"]))
        service = get(_AT["destination_service"])
        edges.append(
            {
                "reporter": get(_AT["reporter"]),
                "source": source,
                "target": target,
                "service": service if service != UNKNOWN else None,
                "security": get(_AT["connection_security_policy"]),
                "opened": opened,
                "closed": telemetry.closed.get(key, 0),
                "requestBytes": telemetry.request_bytes.get(key, 0),
                "responseBytes": telemetry.response_bytes.get(key, 0),
                "denied": 0,
            }
        )
    for (src_ns, src, dst_ns, dst, security), n in list(telemetry.denied.items()):
        edges.append(
            {
                "reporter": "destination",
                "source": _workload(src_ns, src),
                "target": _workload(dst_ns, dst),
                "service": None,
                "security": security,
                "opened": 0,
                "closed": 0,
                "requestBytes": 0,
                "responseBytes": 0,
                "denied": n,
            }
        )
    return {"nodes": [node], "generated": time.time(), "edges": edges}


def merge(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Every node's snapshot as one graph: {nodes: [{id, kind}], edges: [{source, target, ...}], reporters}."""
    by_dest: dict[tuple, dict] = {}
    by_source: dict[tuple, dict] = {}
    for snap in snapshots:
        for e in snap.get("edges", []):
            key = (e["source"], e["target"], e["security"])
            into = by_dest if e["reporter"] == "destination" else by_source
            held = into.get(key)
            if held is None:
                held = into[key] = {**e, **dict.fromkeys(COUNTS, 0)}
            for field in COUNTS:
                held[field] += e.get(field, 0)
            held["service"] = held.get("service") or e.get("service")
    edges = dict(by_dest)
    for key, e in by_source.items():
        if key in edges:
            edges[key]["service"] = edges[key].get("service") or e.get("service")
        else:
            edges[key] = e
    nodes: dict[str, str] = {}
    out = []
    for (source, target, security), e in sorted(edges.items()):
        nodes.setdefault(source, "workload")
        nodes.setdefault(target, "workload")
        if e.get("service"):
            nodes[f"svc:{e['service']}"] = "service"
        out.append(
            {
                "id": f"{source}->{target}:{security}",
                "source": source,
                "target": target,
                "service": e.get("service"),
                "security": security,
                "opened": e["opened"],
                "active": max(0, e["opened"] - e["closed"]),
                "bytes": e["requestBytes"] + e["responseBytes"],
                "denied": e.get("denied", 0),
            }
        )
    return {
        "generated": time.time(),
        "reporters": sorted({n for snap in snapshots for n in snap.get("nodes", [])}),
        "nodes": [{"id": node_id, "kind": kind} for node_id, kind in sorted(nodes.items())],
        "edges": out,
    }


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>noded traffic graph</title>
<style>
 body { font: 13px sans-serif; margin: 0; background: #fafafa; }
 header { padding: 8px 12px; background: #263238; color: #eceff1; }
 svg { width: 100vw; height: calc(100vh - 40px); }
 .node circle { fill: #1e88e5; stroke: #0d47a1; }
 .node.service circle { fill: #8e24aa; stroke: #4a148c; }
 .node.unknown circle { fill: #9e9e9e; }
 .node text { font-size: 12px; }
 .edge line { stroke-width: 2; }
 .edge.mtls line { stroke: #2e7d32; }
 .edge.plain line { stroke: #757575; stroke-dasharray: 6 4; }
 .edge.denied line { stroke: #c62828; stroke-dasharray: 2 3; stroke-width: 3; }
 .edge text { font-size: 11px; fill: #37474f; }
</style></head>
<body><header>noded traffic graph — <span id="summary">loading…</span></header>
<svg id="graph" xmlns="http://www.w3.org/2000/svg"><defs>
 <marker id="arrow" viewBox="0 0 10 10" refX="22" refY="5" markerWidth="6" markerHeight="6" orient="auto">
  <path d="M 0 0 L 10 5 L 0 10 z" fill="#546e7a"/></marker></defs></svg>
<script>
"use strict";
const svg = document.getElementById("graph");
let previous = null;
function el(name, attrs, parent) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  parent.appendChild(e);
  return e;
}
function human(bytes) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
  return bytes.toFixed(i ? 1 : 0) + " " + units[i];
}
function draw(graph) {
  for (const g of [...svg.querySelectorAll("g")]) g.remove();
  const ids = graph.nodes.map(n => n.id);
  const w = svg.clientWidth || 1200, h = svg.clientHeight || 800;
  const r = Math.max(120, Math.min(w, h) / 2 - 110);
  const at = {};
  ids.forEach((id, i) => {
    const a = 2 * Math.PI * i / Math.max(1, ids.length) - Math.PI / 2;
    at[id] = [w / 2 + r * Math.cos(a), h / 2 + r * Math.sin(a)];
  });
  const dt = previous ? Math.max(0.001, (graph.generated - previous.generated)) : null;
  const before = {};
  if (previous) for (const e of previous.edges) before[e.id] = e;
  const edges = el("g", {id: "edges"}, svg);
  const drawn = {};
  const a0 = e => e.source + "|" + e.target;
  for (const e of graph.edges) {
    const hops = e.service ? [[e.source, "svc:" + e.service], ["svc:" + e.service, e.target]] : [[e.source, e.target]];
    const kind = e.denied > 0 && e.opened === 0 ? "denied" : (e.security === "mutual_tls" ? "mtls" : "plain");
    const rate = dt && before[e.id] ? (e.opened - before[e.id].opened) / dt : 0;
    const g = el("g", {"class": "edge " + kind, "data-source": e.source, "data-target": e.target,
      "data-security": e.security, "data-denied": e.denied, "data-opened": e.opened,
      "data-bytes": e.bytes, "data-rate": rate.toFixed(2)}, edges);
    for (const [a, b] of hops) {
      const [x1, y1] = at[a], [x2, y2] = at[b];
      el("line", {x1, y1, x2, y2, "marker-end": "url(#arrow)"}, g);
    }
    const [x1, y1] = at[hops[0][0]], [x2, y2] = at[hops[hops.length - 1][1]];
    const label = kind === "denied" ? `denied ${e.denied}` :
      `${rate.toFixed(1)} conn/s · ${e.opened} conns · ${human(e.bytes)} · ${kind === "mtls" ? "mTLS" : "plaintext"}`;
    // along the edge (crossing edges' labels cross instead of covering each other), upright, a pair's stacked
    const seen = (drawn[a0(e)] = (drawn[a0(e)] || 0) + 1) - 1;
    let angle = Math.atan2(y2 - y1, x2 - x1) * 180 / Math.PI;
    if (angle > 90 || angle < -90) angle += 180;
    const [mx, my] = [(x1 + x2) / 2, (y1 + y2) / 2];
    el("text", {x: mx, y: my - 5 - 14 * seen, "text-anchor": "middle",
      transform: `rotate(${angle.toFixed(1)} ${mx} ${my})`}, g).textContent = label;
  }
  const nodes = el("g", {id: "nodes"}, svg);
  for (const n of graph.nodes) {
    const cls = "node " + n.kind + (n.id === "unknown" ? " unknown" : "");
    const g = el("g", {"class": cls, "data-id": n.id, "data-kind": n.kind}, nodes);
    const [x, y] = at[n.id];
    el("circle", {cx: x, cy: y, r: 14}, g);
    el("text", {x: x, y: y + 30, "text-anchor": "middle"}, g).textContent =
      n.kind === "service" ? n.id.slice(4) + " (service)" : n.id;
  }
  document.getElementById("summary").textContent =
    `${graph.nodes.length} nodes, ${graph.edges.length} edges, from ${graph.reporters.join(", ")}`;
  svg.setAttribute("data-rendered", "true");
  previous = graph;
}
async function refresh() {
  try {
    const response = await fetch("graph.json", {cache: "no-store"});
    draw(await response.json());
  } catch (e) {
    document.getElementById("summary").textContent = "no data: " + e;
  }
}
refresh();
setInterval(refresh, 2000);
</script></body></html>
"""
