"""noded-cni: a chained CNI plugin (spec 1.1 commands), last in the chain.

For now it validates its input and passes prevResult through unchanged; the
hand-off of the pod to the daemon over the API socket comes with capture.
"""

from __future__ import annotations

import json
import os
import sys

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")

# CNI spec error codes
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_INVALID_ENV = 4
ERR_DECODING = 6
ERR_INVALID_CONFIG = 7


class CniFailure(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def _fail(version: str, err: CniFailure) -> int:
    out = {"cniVersion": version, "code": err.code, "msg": err.msg}
    if err.details:
        out["details"] = err.details
    print(json.dumps(out))
    return 1


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
    if command in ("STATUS", "GC"):
        return 0, ""
    for var in ("CNI_CONTAINERID", "CNI_IFNAME") + (("CNI_NETNS",) if command in ("ADD", "CHECK") else ()):
        if not env.get(var):
            raise CniFailure(ERR_INVALID_ENV, f"{var} is required for {command}")
    if command == "ADD":
        prev = conf.get("prevResult")
        if not isinstance(prev, dict):
            raise CniFailure(
                ERR_INVALID_CONFIG, "prevResult: noded-cni is a chained plugin and needs the previous result"
            )
        if not isinstance(prev.get("ips", []), list) or not isinstance(prev.get("interfaces", []), list):
            raise CniFailure(ERR_DECODING, "prevResult: ips and interfaces must be lists")
        return 0, json.dumps({**prev, "cniVersion": version})
    return 0, ""


def main() -> int:
    env = dict(os.environ)
    try:
        stdin = "" if env.get("CNI_COMMAND") == "VERSION" else sys.stdin.read()
    except (OSError, UnicodeDecodeError) as e:
        return _fail("1.1.0", CniFailure(ERR_DECODING, "cannot read the network configuration", str(e)))
    try:
        code, out = run(env, stdin)
    except CniFailure as e:
        version = "1.1.0"
        try:
            parsed = json.loads(stdin)
            if isinstance(parsed, dict) and parsed.get("cniVersion") in SUPPORTED:
                version = parsed["cniVersion"]
        except json.JSONDecodeError:
            pass
        return _fail(version, e)
    if out:
        print(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
