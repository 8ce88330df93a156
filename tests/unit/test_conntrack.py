from noded.kernel.conntrack import Flow, stale

VIP = ("10.96.0.10", 53)


def test_flows_to_a_backend_that_no_longer_serves_are_stale():
    old = Flow(VIP, ("10.244.1.2", 5353))
    kept = Flow(VIP, ("10.244.2.2", 5353))
    assert stale([old, kept], {VIP: frozenset({("10.244.2.2", 5353)})}) == [old]


def test_untranslated_flows_are_stale_once_the_frontend_has_backends():
    blackholed = Flow(VIP, VIP)
    assert stale([blackholed], {VIP: frozenset({("10.244.2.2", 5353)})}) == [blackholed]
    assert stale([blackholed], {VIP: frozenset()}) == []  # still none: nothing to gain


def test_frontends_the_sync_did_not_touch_are_left_alone():
    other = Flow(("10.96.0.11", 53), ("10.244.9.9", 53))
    assert stale([other], {VIP: frozenset()}) == []
    assert stale([Flow(VIP, ("10.244.1.2", 5353))], {VIP: frozenset()}) != []  # service gone: its flows go
