"""Fuzz runs over the inputs a hostile peer, pod or runtime controls, each printing inputs tried and crashes:

- the HTTP/2 frame reader of an HBONE server connection (h2conn.Connection), fed mutated and random byte
  streams: anything but a GOAWAY (H2Error, HPACK errors) escaping is a crash;
- the DNS resolver in userspace (Resolver.resolve) with mutated and random queries: an exception, or a reply
  that does not parse, is not a response to that ID, or is larger than a stranger's query allows;
- the DNS tc fast path for real (a pod netns behind a node netns's bridge, bench reusing the bpf tests'
  setup): mutated queries sent from the pod, every reply checked as above;
- noded-cni's stdin and environment (run(): anything but a CniFailure is a crash; then the binary, for a
  sample, must print a CNI error and never a traceback).

Random mutation from valid seeds (flip, cut, insert, splice), a fixed seed per run so a crash can be
replayed; `--inputs` per target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import table


def mutate(rnd: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.random()
        pos = rnd.randrange(len(out) + 1)
        if op < 0.4 and out:
            out[min(pos, len(out) - 1)] = rnd.randrange(256)
        elif op < 0.55:
            del out[pos : pos + rnd.randint(1, 16)]
        elif op < 0.75:
            out[pos:pos] = rnd.randbytes(rnd.randint(1, 16))
        elif op < 0.9:
            other = rnd.choice(seeds)
            cut = rnd.randrange(len(other) + 1)
            out[pos:] = other[cut:]
        else:
            out[pos:pos] = (rnd.randrange(1 << 24)).to_bytes(3, "big")  # a frame length, say
    return bytes(out)


# -- HTTP/2 --------------------------------------------------------------------------------------------
class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def writelines(self, chunks) -> None:
        pass

    def write(self, data) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def h2_seeds() -> list[bytes]:
    import hpack

    from noded.tunnel import frames as f

    block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    base = f.PREFACE + f.settings({f.INITIAL_WINDOW_SIZE: 65535})
    return [
        base + f.frame(f.HEADERS, f.END_HEADERS, 1, block) + f.frame(f.DATA, 0, 1, b"hello"),
        base + f.frame(f.HEADERS, 0, 1, block[:5]) + f.frame(f.CONTINUATION, f.END_HEADERS, 1, block[5:]),
        base + f.frame(f.PING, 0, 0, b"12345678") + f.window_update(0, 1000) + f.rst_stream(1, 8),
        base + f.frame(f.DATA, f.PADDED, 1, b"\x03abc\x00\x00\x00") + f.goaway(0, 0, b"bye"),
    ]


def fuzz_h2(n: int, seed: int) -> tuple[int, list[str]]:
    import hpack

    from noded.tunnel import h2conn
    from noded.tunnel.frames import H2Error

    rnd = random.Random(seed)
    seeds = h2_seeds()
    crashes: list[str] = []

    async def main() -> None:
        for i in range(n):
            data = mutate(rnd, rnd.choice(seeds), seeds) if i % 10 else rnd.randbytes(rnd.randint(1, 200))
            conn = h2conn.Connection(client=False, on_request=lambda stream, headers: stream.close("fuzz"))
            conn.transport = _Transport()  # what connection_made sets, without the TLS
            try:
                for start in range(0, len(data), 97):  # in pieces, as TLS reads hand it over
                    view = h2conn.scratch(len(conn.input.carry) + 97)
                    piece = data[start : start + 97]
                    view[: len(conn.input.carry)] = conn.input.carry
                    view[len(conn.input.carry) : len(conn.input.carry) + len(piece)] = piece
                    conn.input.feed(view, len(conn.input.carry) + len(piece))
            except (H2Error, hpack.HPACKError):
                pass  # the connection would end with GOAWAY: what is wanted
            except Exception as e:
                crashes.append(f"{type(e).__name__}: {e} <- {data.hex()[:200]}")

    asyncio.run(main())
    return n, crashes


# -- DNS in userspace ------------------------------------------------------------------------------------
def dns_seeds() -> list[bytes]:
    import dns.message

    from tests.dnsfixtures import Z

    names = [(f"web.default.svc.{Z}", "A"), (f"db.default.svc.{Z}", "SRV"), ("example.org", "AAAA")]
    return [dns.message.make_query(n, t, use_edns=e).to_wire() for n, t in names for e in (False, 0)]


def check_reply(query: bytes, reply: bytes | None, stranger: bool) -> str | None:
    import dns.message

    if reply is None:
        return None
    try:
        dns.message.from_wire(reply, ignore_trailing=True, question_only=True)
    except Exception as e:
        if len(reply) != 12:  # the bare header answering an unparseable query is fine
            return f"unparseable reply {type(e).__name__}"
    if reply[:2] != query[:2] or not reply[2] & 0x80:
        return "not a response to it"
    if stranger and len(reply) > len(query):
        return f"an amplifier: {len(query)} in, {len(reply)} out"
    return None


def fuzz_dns(n: int, seed: int) -> tuple[int, list[str]]:
    from noded.dns.resolver import Client, Resolver
    from noded.dns.upstream import Upstreams
    from tests.dnsfixtures import Z, cluster_model

    rnd = random.Random(seed)
    seeds = dns_seeds()
    resolver = Resolver(cluster_model(), Upstreams([], timeout=0.01), Z, search=["corp.internal"])
    crashes: list[str] = []

    async def main() -> None:
        for i in range(n):
            data = mutate(rnd, rnd.choice(seeds), seeds) if i % 10 else rnd.randbytes(rnd.randint(0, 60))
            stranger = i % 3 == 0
            client = Client(allowed=not stranger, namespace=None if stranger else "default")
            try:
                reply = await resolver.resolve(data, client)
            except Exception as e:
                crashes.append(f"{type(e).__name__}: {e} <- {data.hex()}")
                continue
            if len(data) >= 12 and (why := check_reply(data, reply, stranger)):
                crashes.append(f"{why} <- {data.hex()}")

    asyncio.run(main())
    return n, crashes


# -- DNS on the tc fast path ---------------------------------------------------------------------------
FAST = """
import json, random, socket, sys
sys.path.insert(0, sys.argv[4])
from bench.fuzz import mutate, check_reply
seeds = [bytes.fromhex(s) for s in json.loads(sys.argv[1])]
rnd = random.Random(int(sys.argv[3]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("169.254.20.10", 53))
s.settimeout(0.05)
bad, answered = [], 0
for i in range(int(sys.argv[2])):
    data = mutate(rnd, rnd.choice(seeds), seeds)
    if len(data) < 2:
        continue
    s.send(data)
    try:
        reply = s.recv(65535)
    except TimeoutError:
        continue
    answered += 1
    why = check_reply(data, reply, False) if len(data) >= 12 else None
    if why:
        bad.append(why + " <- " + data.hex())
print(json.dumps({"bad": bad, "answered": answered}))
"""


def fuzz_fast_path(n: int, seed: int) -> tuple[int, list[str], dict]:
    from noded.lab import netns
    from tests.bpf.test_dns_fast import POD, dns_fast_env

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with dns_fast_env() as (fast, _resolver, _model, _bridge):
        before = fast.stats()
        seeds = json.dumps([s.hex() for s in dns_seeds()])
        res = subprocess.run(
            netns.nsenter_argv(POD, [sys.executable, "-c", FAST, seeds, str(n), str(seed), root]),
            capture_output=True,
            text=True,
            timeout=1800,
        )
        after = fast.stats()
    if res.returncode != 0:
        return n, [f"the sender failed: {res.stderr[-500:]}"], {}
    out = json.loads(res.stdout)
    counts = {k: after[k] - before[k] for k in ("answered", "passed")}
    return n, out["bad"], {**counts, "replies": out["answered"]}


# -- noded-cni -------------------------------------------------------------------------------------------
def cni_inputs(rnd: random.Random) -> tuple[dict, str]:
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": [{"address": "10.244.1.2/24"}]}
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "noded-cni", "prevResult": prev, "socket": "/nonexistent/s"}
    env = {
        "CNI_COMMAND": rnd.choice(["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", "BOGUS", ""]),
        "CNI_CONTAINERID": rnd.choice(["c1", "../../etc", "", "a" * 300, "x\ny", "ok-1.2_3"]),
        "CNI_IFNAME": rnd.choice(["eth0", ""]),
        "CNI_NETNS": rnd.choice(["/run/netns/x", "", "relative"]),
        "CNI_ARGS": rnd.choice(["K8S_POD_NAMESPACE=a;K8S_POD_NAME=b", ";;==;", "K8S_POD_NAMESPACE=" + "x" * 999, ""]),
    }
    text = json.dumps(conf).encode()
    if rnd.random() < 0.5:
        values = [None, 1, -1, 1e308, "", "x", [], {}, [1, None], {"a": []}, True]
        target = rnd.choice([conf, prev, prev["ips"][0], prev["interfaces"][0]])
        target[rnd.choice([*list(target), "extra"])] = rnd.choice(values)
        text = json.dumps(conf).encode()
    else:
        text = mutate(rnd, text, [text])
    return env, text.decode("utf-8", "replace")


def fuzz_cni(n: int, seed: int) -> tuple[int, list[str]]:
    from noded.cni.plugin import CniFailure, run

    rnd = random.Random(seed)
    crashes: list[str] = []
    samples = []
    for i in range(n):
        env, stdin = cni_inputs(rnd)
        try:
            run(env, stdin)
        except CniFailure:
            pass
        except Exception as e:
            crashes.append(f"{type(e).__name__}: {e} <- {env} {stdin[:200]!r}")
        if i % max(1, n // 50) == 0:
            samples.append((env, stdin))
    for env, stdin in samples:  # the binary as a runtime runs it
        proc = subprocess.run(
            [sys.executable, "-m", "noded.cni.plugin"], input=stdin, env=env, capture_output=True, text=True
        )
        if "Traceback" in proc.stderr or (proc.returncode and not proc.stdout.strip().startswith("{")):
            crashes.append(f"binary: exit {proc.returncode} {proc.stderr[-300:]} <- {env} {stdin[:200]!r}")
    return n + len(samples), crashes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--inputs", type=int, default=20000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", default="h2,dns,fast,cni")
    a = p.parse_args()
    rows, details = [], []
    for name in a.only.split(","):
        start = time.monotonic()
        extra: dict = {}
        if name == "h2":
            tried, crashes = fuzz_h2(a.inputs, a.seed)
            what = "HTTP/2 frame reader (HBONE server connection)"
        elif name == "dns":
            tried, crashes = fuzz_dns(a.inputs, a.seed)
            what = "DNS resolver, userspace"
        elif name == "fast":
            tried, crashes, extra = fuzz_fast_path(a.inputs, a.seed)
            what = "DNS tc fast path (pod netns -> bridge)"
        else:
            tried, crashes = fuzz_cni(a.inputs, a.seed)
            what = "noded-cni stdin + env (in-process, then the binary)"
        rows.append([what, tried, len(crashes), f"{time.monotonic() - start:.0f}", json.dumps(extra) if extra else ""])
        details += crashes[:5]
        print(rows[-1], file=sys.stderr, flush=True)
    print(table(f"fuzz runs (seed {a.seed})", ["target", "inputs", "crashes", "seconds", "notes"], rows))
    for line in details:
        print("CRASH", line)


if __name__ == "__main__":
    main()
