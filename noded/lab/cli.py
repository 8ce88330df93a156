"""`noded lab …` verbs. The lab itself (pyroute2, the CNI plugins' driver) is imported only when a verb
runs: every `noded` command builds this parser, and `noded run` should not pay 0.2 s for it."""

from __future__ import annotations

import argparse
import json
import sys


def _labels(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--labels: {part!r} is not k=v")
        out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    from noded.lab.cni import CniError
    from noded.lab.lab import Lab, LabError

    lab = Lab()
    try:
        if args.lab_command == "up":
            state = lab.up(args.nodes, args.mode)
            for node in state["nodes"].values():
                print(f"{node['name']}: {node['address']} pods {node['podCIDR']} (netns {node['netns']})")
        elif args.lab_command == "down":
            for what in lab.down():
                print(f"removed {what}")
        elif args.lab_command == "apply":
            for what in lab.apply(args.file):
                print(f"applied {what}")
        elif args.lab_command == "delete":
            lab.delete(args.file)
        elif args.lab_command == "pod":
            pod = lab.add_pod(args.pod, args.node, args.labels, args.serviceaccount)
            print(f"{pod['namespace']}/{pod['name']} on {pod['node']}: {', '.join(pod['ips'])}")
        elif args.lab_command == "exec":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                raise LabError("exec: give a command after --")
            lab.exec(args.target, cmd)
        elif args.lab_command == "status":
            status = lab.status()
            if args.output == "json":
                print(json.dumps(status, indent=2))
            else:
                for n in status["nodes"]:
                    print(f"node {n['name']:<8} {n['address']:<14} {n['podCIDR']:<16} noded pid {n['daemonPid']}")
                for p in status["pods"]:
                    print(f"pod  {p['namespace']}/{p['name']:<20} {p['node']:<8} {', '.join(p['ips'])}")
                for s in status["services"]:
                    print(f"svc  {s['namespace']}/{s['name']:<20} {', '.join(s['clusterIPs'])}")
        elif args.lab_command == "graph":
            import threading

            from noded.lab.graphview import serve

            server = serve(lab, args.port)
            print(f"the lab's traffic graph: http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C ends it)")
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                server.shutdown()
        elif args.lab_command == "demo":
            from noded.lab.demo import demo

            if args.mesh and args.waypoint:
                from noded.lab.waypoint_demo import waypoint_demo

                return waypoint_demo(lab, keep=args.keep)
            if args.mesh:
                from noded.lab.mesh_demo import mesh_demo

                return mesh_demo(lab, keep=args.keep)
            return demo(lab, keep=args.keep, mode=args.mode)
    except (LabError, CniError) as e:
        print(f"noded lab: {e}", file=sys.stderr)
        return 1
    return 0


def add_lab_parser(sub: argparse._SubParsersAction) -> None:
    from noded.cli import Help

    lab = sub.add_parser(
        "lab", help="the multi-node lab on network namespaces", description="the multi-node lab on network namespaces"
    )
    lab.set_defaults(fn=run)
    verbs = lab.add_subparsers(dest="lab_command", required=True, metavar="VERB")

    def verb(name: str, helptext: str) -> argparse.ArgumentParser:
        return verbs.add_parser(name, help=helptext, description=helptext, formatter_class=Help)

    up = verb("up", "bring up nodes (netns, fabric, CNI chain, a noded each)")
    up.add_argument("--nodes", type=int, default=2, help="how many nodes")
    up.add_argument("--mode", default="ebpf", choices=["ebpf", "nftables", "iptables"], help="services mode")
    verb("down", "remove the lab and everything it made")
    for name, helptext in (("apply", "add the objects of a manifest file"), ("delete", "remove a file's objects")):
        v = verb(name, helptext)
        v.add_argument("-f", "--file", required=True, help="the manifest file (YAML or JSON)")
    pod = verb("pod", "add a pod (its netns, the CNI chain: noded-cni hands it to the node's daemon)")
    pod.add_argument("pod", metavar="NAMESPACE/NAME", help="the pod's namespace and name")
    pod.add_argument("--node", required=True, help="the node it runs on")
    pod.add_argument("--labels", type=_labels, default={}, help="labels, key=value[,key=value]")
    pod.add_argument("--serviceaccount", default="default", help="its service account (its mesh identity)")
    ex = verb("exec", "run a command in a pod, on a node, or on the external host")
    ex.add_argument("target", metavar="NAMESPACE/NAME|node/NODE|external", help="where to run it")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="the command and its arguments")
    st = verb("status", "the lab's nodes, pods and services")
    st.add_argument("-o", "--output", choices=["table", "json"], default="table", help="output format")
    graph = verb("graph", "serve the lab-wide traffic graph (every node's merged) on a loopback port")
    graph.add_argument("--port", type=int, default=8088, help="the port on 127.0.0.1")
    demo = verb("demo", "bring up a lab and show the main job working")
    demo.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    demo.add_argument("--mode", default="ebpf", choices=["ebpf"], help="services mode")
    demo.add_argument("--mesh", action="store_true", help="the podless ambient scenario: DNS, VIP, tunnel, policy")
    demo.add_argument(
        "--waypoint", action="store_true", help="with --mesh: the waypoint (L7 policy, request IDs, canary split)"
    )
