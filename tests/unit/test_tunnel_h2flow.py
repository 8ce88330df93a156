"""HTTP/2 flow control sans I/O (h2flow.FlowControl): the windows both ways, as RFC 9113 §5.2 and §6.9 say."""

import pytest

from noded.tunnel import frames as f
from noded.tunnel.frames import ErrorCode, H2Error
from noded.tunnel.h2flow import FlowControl

W = 1024  # a small window: the arithmetic is the same


def test_a_new_stream_may_send_the_peers_initial_window_and_settings_move_open_streams():
    flow = FlowControl(W)
    a = flow.stream(1)
    assert a.send == f.DEFAULT_WINDOW and flow.credit(a) == f.DEFAULT_WINDOW
    flow.sent(a, 1000)
    assert (a.send, flow.send) == (f.DEFAULT_WINDOW - 1000, f.DEFAULT_WINDOW - 1000)
    flow.peer_initial_window(100, [a])  # shrinks below what was sent: negative, as RFC 9113 §6.9.2 allows
    assert a.send == 100 - 1000 and flow.credit(a) < 0
    b = flow.stream(3)
    assert b.send == 100
    flow.connection_update(5000)
    assert flow.credit(b) == 100  # the stream's window bounds it, not the connection's


def test_a_window_past_2_to_the_31_is_a_flow_control_error():
    flow = FlowControl(W)
    stream = flow.stream(1)
    assert flow.stream_update(stream, f.MAX_WINDOW - stream.send)
    assert not flow.stream_update(stream, 1)  # the stream is reset, the connection goes on
    with pytest.raises(H2Error) as e:
        flow.connection_update(f.MAX_WINDOW)
    assert e.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_data_beyond_either_window_is_refused():
    flow = FlowControl(W)
    stream = flow.stream(1)
    flow.data_arrives(stream, W, 0)
    assert flow.due(None, False, False) == [(0, W)]  # the connection's window back, not the stream's
    with pytest.raises(H2Error, match="stream window"):
        flow.data_arrives(stream, 1, 0)
    flow = FlowControl(W)
    flow.data_arrives(None, W, 0)  # a stream no longer carried still counts on the connection
    with pytest.raises(H2Error, match="connection window") as e:
        flow.data_arrives(None, 1, 0)
    assert e.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_given_back_once_half_is_used_a_streams_only_while_its_application_keeps_up():
    flow = FlowControl(W)
    stream = flow.stream(1)
    flow.data_arrives(stream, 300, 0)
    flow.delivered(stream, 300)
    assert flow.due(stream, True, True) == []  # under half of either window
    flow.data_arrives(stream, 300, 0)
    flow.delivered(stream, 300)
    assert flow.due(stream, True, False) == [(0, 600)]  # the connection's at once; the slow stream's held
    assert (flow.recv, stream.recv, stream.unacked) == (W, W - 600, 600)
    assert flow.due(stream, True, True) == [(1, 600)]  # its application caught up
    assert (stream.recv, stream.unacked) == (W, 0)


def test_a_stream_with_less_than_half_left_gets_it_back_and_padding_with_it():
    flow = FlowControl(W)
    stream = flow.stream(1)
    flow.data_arrives(stream, 200, 0)
    flow.delivered(stream, 200)
    stream.recv = 400  # the rest held back while its application was slow, since given back in part
    flow.data_arrives(stream, 11, 11)  # a DATA frame of padding only: its length byte and 10 bytes
    assert flow.due(stream, True, True) == [(1, 211)]


def test_nothing_given_back_for_a_stream_the_peer_has_ended():
    flow = FlowControl(W)
    stream = flow.stream(1)
    flow.data_arrives(stream, W // 2, 0)
    flow.delivered(stream, W // 2)
    assert flow.due(stream, False, True) == [(0, W // 2)]  # the connection's only
    assert flow.opening_update() == W - f.DEFAULT_WINDOW
