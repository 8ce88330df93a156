"""noded/bpf/nat_gc.py mirrors noded_ct_timeout() of bpf/include/noded_lb.h by hand: the two must agree, or
the collector deletes flows the tc programs still use (or keeps ones they dropped)."""

import os
import re

from noded.bpf import nat_gc, structs

HEADER = os.path.join(os.path.dirname(__file__), "..", "..", "bpf", "include", "noded_lb.h")


def test_the_collector_uses_the_programs_timeouts():
    with open(HEADER) as f:
        text = f.read()
    c = {
        name: int(sec) * nat_gc.SEC
        for name, sec in re.findall(r"#define NODED_CT_(\w+)\s+\((\d+) \* NODED_SEC\)", text)
    }
    assert nat_gc.timeout(structs.CT_NEW, nat_gc.TCP) == c["NEW_TIMEOUT_TCP"]
    assert nat_gc.timeout(structs.CT_REPLIED, nat_gc.UDP) == c["NEW_TIMEOUT_UDP"]
    assert nat_gc.timeout(structs.CT_ESTABLISHED, nat_gc.TCP) == c["TCP_TIMEOUT"]
    assert nat_gc.timeout(structs.CT_ESTABLISHED, nat_gc.UDP) == c["UDP_TIMEOUT"]
    assert nat_gc.timeout(structs.CT_CLOSING, nat_gc.TCP) == c["CLOSING_TIMEOUT"]
    # the states' values themselves: enum noded_ct_state, checked against BTF (tests/bpf/test_btf_layout.py)
