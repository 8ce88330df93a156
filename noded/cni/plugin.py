"""noded-cni: a chained CNI plugin (spec 1.1 commands), last in the chain.

It validates its input, hands the pod to the daemon over the API socket (a unary gRPC call made with
the standard library only, so it starts in milliseconds; it imports nothing it can do without, not even
contextlib) and passes prevResult through unchanged.
When the daemon is unreachable, ADD fails (the runtime retries) for pods of namespaces the daemon last
published as enrolled, unless `failPolicy: open`; other pods are left in a pending file that the daemon
takes on its next start. DEL always succeeds once its input is valid.
"""

from __future__ import annotations

import json
import os
import sys

from noded.api import h2client

DEFAULT_SOCKET = "/run/noded/noded.sock"
METHOD = "/noded.v1.Noded/"

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")

# CNI spec error codes
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_INVALID_ENV = 4
ERR_DECODING = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_NOT_AVAILABLE = 50  # STATUS: the plugin cannot serve ADD now
ERR_DAEMON = 100  # plugin-specific: the daemon refused the pod


class CniFailure(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def error_reply(version: str, err: CniFailure) -> str:
    """The CNI error result for err, as the plugin prints it."""
    out = {"cniVersion": version, "code": err.code, "msg": err.msg}
    if err.details:
        out["details"] = err.details
    return json.dumps(out)


def run(env: dict[str, str], stdin: str) -> tuple[int, str]:
    command = env.get("CNI_COMMAND", "")
    if command == "VERSION":
        return 0, json.dumps({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED})
    if command not in COMMANDS:
        raise CniFailure(ERR_INVALID_ENV, "CNI_COMMAND is missing or unknown", f"got {command!r}")
    try:
        conf = json.loads(stdin)
    except json.JSONDecodeError as e:
        raise CniFailure(ERR_DECODING, "network configuration is not JSON", str(e)) from None
    if not isinstance(conf, dict):
        raise CniFailure(ERR_DECODING, "network configuration is not a JSON object")
    version = conf.get("cniVersion")
    if version not in SUPPORTED:
        raise CniFailure(ERR_INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not supported")
    if conf.get("type") != "noded-cni":
        raise CniFailure(ERR_INVALID_CONFIG, f"type: expected 'noded-cni', got {conf.get('type')!r}")
    socket_path = conf.get("socket", DEFAULT_SOCKET)
    if not isinstance(socket_path, str) or not socket_path.startswith("/"):
        raise CniFailure(ERR_INVALID_CONFIG, f"socket: expected an absolute path, got {socket_path!r}")
    fail_open = conf.get("failPolicy", "closed")
    if fail_open not in ("open", "closed"):
        raise CniFailure(ERR_INVALID_CONFIG, f"failPolicy: expected 'open' or 'closed', got {fail_open!r}")
    daemon = Daemon(socket_path, fail_open == "open")
    if command == "STATUS":
        daemon.status()
        return 0, ""
    if command == "GC":
        valid = conf.get("cni.dev/valid-attachments", [])
        if not isinstance(valid, list):
            raise CniFailure(ERR_INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
        daemon.call_if_up("PodGc", {"valid": [a.get("containerID") for a in valid if isinstance(a, dict)]})
        return 0, ""
    for var in ("CNI_CONTAINERID", "CNI_IFNAME") + (("CNI_NETNS",) if command in ("ADD", "CHECK") else ()):
        if not env.get(var):
            raise CniFailure(ERR_INVALID_ENV, f"{var} is required for {command}")
    if not valid_container_id(env["CNI_CONTAINERID"]):  # it names files in the state directory
        raise CniFailure(ERR_INVALID_ENV, "CNI_CONTAINERID: letters, digits, _ . - only, starting alphanumeric")
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    pod = {
        "containerId": env["CNI_CONTAINERID"],
        "netns": env.get("CNI_NETNS", ""),
        "ifName": env["CNI_IFNAME"],
        "namespace": args.get("K8S_POD_NAMESPACE", ""),
        "name": args.get("K8S_POD_NAME", ""),
    }
    if command == "DEL":
        daemon.call_if_up("PodDel", {"containerId": pod["containerId"]})
        daemon.forget_pending(pod["containerId"])
        return 0, ""
    prev = conf.get("prevResult")
    if not isinstance(prev, dict):
        raise CniFailure(ERR_INVALID_CONFIG, "prevResult: noded-cni is a chained plugin and needs the previous result")
    if not isinstance(prev.get("ips", []), list) or not isinstance(prev.get("interfaces", []), list):
        raise CniFailure(ERR_DECODING, "prevResult: ips and interfaces must be lists")
    for i, ip in enumerate(prev.get("ips", [])):
        if not isinstance(ip, dict) or not isinstance(ip.get("address", ""), str):
            raise CniFailure(ERR_DECODING, f"prevResult.ips[{i}]: expected an object with a string address")
    if not pod["namespace"] or not pod["name"]:  # not a Kubernetes pod: nothing to capture
        return 0, json.dumps({**prev, "cniVersion": version}) if command == "ADD" else ""
    pod["ips"] = [ip.get("address", "").split("/")[0] for ip in prev.get("ips", []) if isinstance(ip, dict)]
    if command == "CHECK":
        reply = daemon.call("PodCheck", pod)
        if not reply.get("ok"):
            raise CniFailure(ERR_DAEMON, "noded: the pod's capture is not in place", reply.get("error", ""))
        return 0, ""
    daemon.add(pod)
    return 0, json.dumps({**prev, "cniVersion": version})


def valid_container_id(cid: str) -> bool:
    """The CNI spec's container ID: alphanumeric first, then alphanumerics, _ . - (no /, never ..)."""
    return (
        0 < len(cid) <= 256
        and cid[0].isascii()
        and cid[0].isalnum()
        and all(c.isascii() and (c.isalnum() or c in "_.-") for c in cid)
    )


def parse_cni_args(raw: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in raw.split(";") if "=" in part)


class Daemon:
    """The daemon as noded-cni sees it: reachable over the socket, or not."""

    def __init__(self, socket_path: str, fail_open: bool) -> None:
        self.socket = socket_path
        self.fail_open = fail_open
        self.state_dir = os.path.dirname(socket_path)

    def call(self, method: str, message: dict) -> dict:
        try:
            return h2client.call(self.socket, METHOD + method, message)
        except OSError as e:
            raise CniFailure(ERR_TRY_AGAIN_LATER, f"noded is not reachable at {self.socket}", str(e)) from None
        except (h2client.CallError, ValueError) as e:
            raise CniFailure(ERR_DAEMON, f"noded did not answer {method}", str(e)) from None

    def call_if_up(self, method: str, message: dict) -> None:
        # DEL and GC succeed without the daemon; it drops dead pods on its next start
        try:  # noqa: SIM105 -- contextlib's import would cost the plugin's start
            h2client.call(self.socket, METHOD + method, message)
        except (OSError, h2client.CallError, ValueError):
            pass

    def status(self) -> None:
        try:
            h2client.call(self.socket, METHOD + "Status", {})
        except (OSError, h2client.CallError, ValueError) as e:
            if not self.fail_open:
                raise CniFailure(ERR_NOT_AVAILABLE, f"noded is not reachable at {self.socket}", str(e)) from None

    def add(self, pod: dict) -> None:
        """Hand the pod to the daemon. Unreachable: fail closed (kubelet tries again) unless failPolicy open
        says so; then the pod is left pending for the daemon's next start. noded-cni cannot see a pod's own
        labels, so any pod may be enrolled: none starts uncaptured behind noded's back."""
        try:
            reply = h2client.call(self.socket, METHOD + "PodAdd", pod)
        except (OSError, h2client.CallError) as e:
            if not self.fail_open:
                raise CniFailure(
                    ERR_TRY_AGAIN_LATER, f"noded is not reachable at {self.socket} (failPolicy closed)", str(e)
                ) from None
            self._leave_pending(pod)
            return
        if not reply.get("ok"):
            code = ERR_TRY_AGAIN_LATER if reply.get("retry") else ERR_DAEMON
            raise CniFailure(code, "noded could not set up the pod's capture", reply.get("error", ""))

    def _leave_pending(self, pod: dict) -> None:
        pending = os.path.join(self.state_dir, "pending")
        try:
            os.makedirs(pending, exist_ok=True)
            with open(os.path.join(pending, f"{pod['containerId']}.json"), "w") as f:
                json.dump(pod, f)
        except OSError:
            pass  # nowhere to leave it: the pod runs without capture until it is recreated

    def forget_pending(self, container_id: str) -> None:
        try:  # noqa: SIM105
            os.unlink(os.path.join(self.state_dir, "pending", f"{container_id}.json"))
        except OSError:
            pass


def call(env: dict[str, str], stdin: str) -> tuple[int, str]:
    """The exit code and what to print, for any input: run()'s answer, or the CNI error (never a traceback).
    What the launcher's main() and the daemon's forwarding socket (for the static plugin) both answer."""
    try:
        try:
            return run(env, stdin)
        except CniFailure:
            raise
        except Exception as e:  # whatever the input: a CNI error on stdout, never a traceback
            raise CniFailure(ERR_INVALID_CONFIG, "noded-cni could not handle this request", repr(e)[:300]) from None
    except CniFailure as e:
        version = "1.1.0"
        try:
            parsed = json.loads(stdin)
            if isinstance(parsed, dict) and parsed.get("cniVersion") in SUPPORTED:
                version = parsed["cniVersion"]
        except (json.JSONDecodeError, TypeError):
            pass
        return 1, error_reply(version, e)


def main() -> int:
    env = dict(os.environ)
    try:
        stdin = "" if env.get("CNI_COMMAND") == "VERSION" else sys.stdin.read()
    except (OSError, UnicodeDecodeError) as e:
        print(error_reply("1.1.0", CniFailure(ERR_DECODING, "cannot read the network configuration", str(e))))
        return 1
    code, out = call(env, stdin)
    if out:
        print(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
