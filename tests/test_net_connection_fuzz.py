"""Arbitrary authenticated mux traffic into a live server-side connection (no sockets:
the connection is driven through an in-memory pipe, the same interface hole-punched
and relayed pipes use). Whatever arrives, the connection either keeps working or
closes with a coded error; nothing escapes, nothing grows without bound."""

from __future__ import annotations

import asyncio

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmd.errors import ALL_CODES
from swarmd.net import mux
from swarmd.net.connection import SecureConnection
from swarmd.net.noise import NoiseSession
from swarmd.node.identity import Identity
from swarmd.rpc import RpcPeer
from tests.rpc_helpers import make_methods

SERVER = Identity.from_seed(b"s" * 32)
CLIENT = Identity.from_seed(b"c" * 32)


class MemoryPipe:
    """Collects what the connection writes; close() is recorded."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True


envelopes = st.one_of(
    st.builds(
        lambda i, m, p, t, c: msgpack.packb([0, i, m, p, t, c]),
        st.integers(-2, 2**63),
        st.sampled_from(["echo", "ping", "upload", "download", "nope", "", "sleep"]),
        st.one_of(
            st.none(),
            st.integers(-(2**63), 2**63 - 1),
            st.binary(max_size=20),
            st.dictionaries(st.text(max_size=4), st.integers(0, 9), max_size=2),
        ),
        st.one_of(st.none(), st.integers(-10, 10**6)),
        st.integers(-1, 12),
    ),
    st.builds(lambda k, i: msgpack.packb([k, i, None]), st.integers(0, 6), st.integers(0, 5)),
    st.binary(max_size=40),
)
frames = st.one_of(
    st.builds(lambda p: mux.encode(mux.MSG, 0, p), envelopes),
    st.builds(
        lambda t, c, p: mux.encode(t, c, p), st.integers(0, 8), st.integers(0, 12), st.binary(max_size=70)
    ),
    st.builds(lambda c, n: mux.encode_credit(c, n), st.integers(0, 12), st.integers(0, 2**32 - 1)),
)


async def drive(batches: list[list[bytes]]) -> None:
    conn = SecureConnection(SERVER, initiator=False)
    peer = RpcPeer(conn, make_methods())
    pipe = MemoryPipe()
    conn.connection_made(pipe)
    client = NoiseSession(CLIENT, initiator=True, remote_public_key=SERVER.public_key)
    conn.data_received(client.start())
    out, _ = client.receive(bytes(pipe.out))
    pipe.out.clear()
    conn.data_received(out)  # the client's cipher upgrade offer
    assert conn.established.done() and conn.remote_public_key == CLIENT.public_key
    for batch in batches:
        conn.data_received(client.encrypt(b"".join(batch)))
        await asyncio.sleep(0)  # let handlers that suspended run a step
        if conn.is_closed:
            break
    if conn.is_closed:
        assert conn.error is not None and conn.error.code in ALL_CODES
    else:
        assert len(conn._channels) <= conn.config.max_streams
        assert all(sum(map(len, ch._chunks)) <= mux.INITIAL_WINDOW for ch in conn._channels.values())
    await peer.close()
    assert not peer._running


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(frames, min_size=1, max_size=6), min_size=1, max_size=5))
def test_connection_survives_arbitrary_authenticated_frames(batches: list[list[bytes]]) -> None:
    asyncio.run(drive(batches))


async def deliver_in_order(messages: list[bytes], split: int) -> tuple[list[bytes], bytes]:
    conn = SecureConnection(SERVER, initiator=False)
    got: list[bytes] = []
    pipe = MemoryPipe()
    conn.connection_made(pipe)
    conn.on_message = got.append
    client = NoiseSession(CLIENT, initiator=True, remote_public_key=SERVER.public_key)
    conn.data_received(client.start())
    out, _ = client.receive(bytes(pipe.out))
    pipe.out.clear()
    conn.data_received(out)  # the client's cipher upgrade offer
    stream = b"".join(messages)
    # one Noise message per side of the split: a frame may be cut in two
    for part in (stream[:split], stream[split:]):
        if part:
            conn.data_received(client.encrypt(part))
    _, pong = client.receive(bytes(pipe.out))
    conn.close(tell_peer=False)
    return got, b"".join(pong)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=30), min_size=1, max_size=8), st.integers(0, 10), st.data())
def test_batched_calls_arrive_whole_and_in_order(payloads: list[bytes], ping_at: int, data: st.DataObject) -> None:
    """Several channel-0 messages in one Noise message (calls batched by a flush), a control
    frame among them and a message cut across two Noise messages: each arrives once, whole,
    in order, and the PING is answered."""
    frames = [mux.encode(mux.MSG, 0, p) for p in payloads]
    frames.insert(min(ping_at, len(frames)), mux.encode(mux.PING, 0, b"p"))
    split = data.draw(st.integers(0, sum(map(len, frames))))
    got, pong = asyncio.run(deliver_in_order(frames, split))
    assert got == payloads
    assert pong == mux.encode(mux.PONG, 0, b"p")
