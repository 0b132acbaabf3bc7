"""Streams over the mux: upload, download, flow control, aborts, pings beside bulk data."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from swarmd.errors import ERR_CANCELLED, ERR_CLOSED, ERR_OVERLOADED, ERR_UNKNOWN_METHOD, SwarmdError
from swarmd.net import mux
from swarmd.node.identity import Identity
from swarmd.rpc import CallContext, RpcConfig, RpcServer, Stream, connect
from tests.rpc_helpers import make_methods

T = 30.0


@pytest.fixture
async def server():
    srv = RpcServer(Identity.generate(), make_methods())
    await srv.start()
    yield srv
    await srv.stop()


async def test_upload_and_download(server: RpcServer) -> None:
    peer = await connect(None, "127.0.0.1", server.port, timeout=T)
    try:
        s = await peer.open_stream("upload", timeout=T)
        for _ in range(40):
            await s.send(b"u" * 100_000)
        await s.close()
        assert await s.result() == 4_000_000
        s = await peer.open_stream("download", {"size": 3_000_001, "chunk": 70_000}, timeout=T)
        got = bytearray()
        while (chunk := await s.recv()) is not None:
            got += chunk
        assert len(got) == 3_000_001 and await s.result() == 3_000_001
        assert peer.conn._channels == {}  # both channels released
    finally:
        await peer.close()


async def test_a_wait_for_the_result_given_up_leaves_the_result_to_a_later_wait(server: RpcServer) -> None:
    """A timeout around result() ends that wait only: the upload goes on and its result still comes."""
    peer = await connect(None, "127.0.0.1", server.port, timeout=T)
    try:
        s = await peer.open_stream("upload", timeout=T)
        await s.send(b"u" * 1000)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):  # the upload is not closed: no result can come yet
                await s.result()
        await s.send(b"u" * 500)
        await s.close()
        assert await s.result() == 1500
    finally:
        await peer.close()


async def test_receiver_that_stops_reading_bounds_the_sender(server: RpcServer) -> None:
    """A download nobody reads stops at the window; the connection stays usable."""
    peer = await connect(None, "127.0.0.1", server.port, timeout=T)
    try:
        s = await peer.open_stream("download", {"size": 50_000_000}, timeout=T)
        ch = s.channel
        for _ in range(2000):
            if sum(map(len, ch._chunks)) >= mux.INITIAL_WINDOW:
                break
            await peer.call("ping", timeout=T)
        assert sum(map(len, ch._chunks)) == mux.INITIAL_WINDOW  # exactly the credit, not a byte more
        assert await peer.call("echo", "not delayed", timeout=T) == "not delayed"
        got = 0
        while (chunk := await s.recv()) is not None:
            got += len(chunk)
        assert got == 50_000_000
    finally:
        await peer.close()


async def test_calls_interleave_with_bulk_stream(server: RpcServer) -> None:
    peer = await connect(None, "127.0.0.1", server.port, timeout=T)
    try:
        s = await peer.open_stream("download", {"size": 20_000_000}, timeout=T)

        async def drain() -> int:
            n = 0
            while (c := await s.recv()) is not None:
                n += len(c)
            return n

        reader = asyncio.create_task(drain())
        pings = 0
        while not reader.done() and pings < 50:
            assert await peer.call("ping", timeout=T) == "pong"
            pings += 1
        assert await reader == 20_000_000
    finally:
        await peer.close()


@pytest.fixture
async def bad_server():
    """A server whose stream method "bad" sends a chunk, then fails with ERR_OVERLOADED."""
    methods = make_methods()

    async def bad(ctx: CallContext, params: Any, stream: Stream) -> Any:
        await stream.send(b"partial")
        raise SwarmdError(ERR_OVERLOADED, "disk full")

    methods.register_stream("bad", bad)
    srv = RpcServer(Identity.generate(), methods)
    await srv.start()
    yield srv
    await srv.stop()


async def test_stream_handler_error_reaches_both_result_and_recv(bad_server: RpcServer) -> None:
    peer = await connect(None, "127.0.0.1", bad_server.port, timeout=T)
    try:
        s = await peer.open_stream("bad", timeout=T)
        with pytest.raises(SwarmdError) as ei:
            await s.result()
        assert ei.value.code == ERR_OVERLOADED
        with pytest.raises(SwarmdError):
            while await s.recv() is not None:
                pass
        s = await peer.open_stream("nope", timeout=T)
        with pytest.raises(SwarmdError) as ei:
            await s.result()
        assert ei.value.code == ERR_UNKNOWN_METHOD
        assert await peer.call("ping", timeout=T) == "pong"
    finally:
        await peer.close()


async def test_aborting_a_stream_whose_call_failed_leaves_no_unretrieved_error(bad_server: RpcServer) -> None:
    """A caller that gives a stream up (abort, e.g. `async with` on an error) after the
    handler's error arrived never awaits result(): that error must not be reported as
    "Future exception was never retrieved" when the stream is collected."""
    peer = await connect(None, "127.0.0.1", bad_server.port, timeout=T)
    try:
        s = await peer.open_stream("bad", timeout=T)
        result = s._result
        assert result is not None
        done, _ = await asyncio.wait([result], timeout=T)  # failed, awaited by no one
        assert done and not result.cancelled()
        assert result._log_traceback  # an error no one retrieved: reported when collected
        s.abort()
        assert not result._log_traceback  # retrieved by the abort: nothing reported at collection
        assert await peer.call("ping", timeout=T) == "pong"
    finally:
        await peer.close()


async def test_abort_cancels_the_remote_handler() -> None:
    methods = make_methods()
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def sink(ctx: CallContext, params: Any, stream: Stream) -> Any:
        try:
            while await stream.recv() is not None:
                pass
        except SwarmdError as e:
            await seen.put(e.code)
            raise
        except asyncio.CancelledError:
            await seen.put("cancelled")
            raise
        return "finished"

    methods.register_stream("sink", sink, op="w")
    srv = RpcServer(Identity.generate(), methods)
    await srv.start()
    peer = await connect(None, "127.0.0.1", srv.port, timeout=T)
    try:
        s = await peer.open_stream("sink", timeout=T)
        await s.send(b"x" * 1000)
        s.abort()
        assert await asyncio.wait_for(seen.get(), T) in (ERR_CANCELLED, "cancelled")
        with pytest.raises(SwarmdError) as ei:
            await s.result()
        assert ei.value.code == ERR_CANCELLED
        with pytest.raises(SwarmdError):
            await s.send(b"more")
        assert await peer.call("ping", timeout=T) == "pong"
    finally:
        await peer.close()
        await srv.stop()


async def test_stream_limit_per_connection() -> None:
    cfg = RpcConfig()
    cfg.net.max_streams = 2
    srv = RpcServer(Identity.generate(), make_methods(), config=cfg)
    await srv.start()
    peer = await connect(None, "127.0.0.1", srv.port, timeout=T, config=cfg)
    try:
        a = await peer.open_stream("upload", timeout=T)
        b = await peer.open_stream("upload", timeout=T)
        with pytest.raises(SwarmdError) as ei:
            await peer.open_stream("upload", timeout=T)
        assert ei.value.code == ERR_OVERLOADED
        for s in (a, b):
            await s.close()
            assert await s.result() == 0
    finally:
        await peer.close()
        await srv.stop()


async def test_connection_loss_fails_open_streams() -> None:
    srv = RpcServer(Identity.generate(), make_methods())
    await srv.start()
    peer = await connect(None, "127.0.0.1", srv.port, timeout=T)
    s = await peer.open_stream("download", {"size": 100_000_000}, timeout=T)
    assert await s.recv()
    await srv.stop()
    with pytest.raises(SwarmdError) as ei:
        while await asyncio.wait_for(s.recv(), T) is not None:
            pass
    assert ei.value.code == ERR_CLOSED
    with pytest.raises(SwarmdError) as ei:
        await asyncio.wait_for(s.result(), T)
    assert ei.value.code == ERR_CLOSED
    await peer.close()


async def test_blob_integrity_through_many_chunk_sizes(server: RpcServer) -> None:
    methods_digest = hashlib.sha256()
    peer = await connect(None, "127.0.0.1", server.port, timeout=T)
    try:
        s = await peer.open_stream("upload", timeout=T)
        for size in (1, 65535, 65536, 65537, 300_000, 7):
            data = bytes([size % 251]) * size
            methods_digest.update(data)
            await s.send(data)
        await s.close()
        assert await s.result() == 1 + 65535 + 65536 + 65537 + 300_000 + 7
    finally:
        await peer.close()


def _held_by(srv: RpcServer) -> int:
    """Stream bytes the server holds for its peers: unread received chunks and unsent writes."""
    total = 0
    for p in srv.peers:
        total += sum(sum(map(len, ch._chunks)) for ch in p.conn._channels.values())
        pipe = p.conn._pipe
        if pipe is not None:
            total += pipe.get_write_buffer_size()
    return total


async def _settled(streams: list[Stream], n: int) -> list[Stream]:
    """The first n streams whose call ended (the refused ones: the accepted ones run until released)."""
    pending = {asyncio.ensure_future(s.result()): s for s in streams}
    done: list[Stream] = []
    async with asyncio.timeout(T):
        while len(done) < n:
            finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for f in finished:
                f.exception()  # the caller awaits the stream's result itself
                done.append(pending.pop(f))
    for f in pending:
        f.cancel()
    return done


async def test_stream_buffers_are_capped_per_connection_and_per_process() -> None:
    """Streams a peer opens and leaves unread (its downloads) or fills for a handler that reads
    nothing yet pin one window each: a connection gets max_stream_buffer of them, all peers together
    max_stream_buffer_total; a stream beyond fails alone with ERR_OVERLOADED, the connection stays."""
    w = mux.INITIAL_WINDOW
    cfg = RpcConfig()
    cfg.net.max_stream_buffer = 4 * w
    cfg.net.max_stream_buffer_total = 6 * w
    go = asyncio.Event()
    methods = make_methods()

    async def park(ctx: CallContext, params: Any, stream: Stream) -> int:
        await go.wait()  # reads nothing until told: what the peer sent waits in our buffers
        n = 0
        while (chunk := await stream.recv()) is not None:
            n += len(chunk)
        return n

    methods.register_stream("park", park)
    srv = RpcServer(Identity.generate(), methods, config=cfg)
    await srv.start()
    a = await connect(None, "127.0.0.1", srv.port, timeout=T)
    b = await connect(None, "127.0.0.1", srv.port, timeout=T)
    sends: list[asyncio.Task[Any]] = []
    try:
        # a: six downloads it never reads; four fit its connection's share
        downs = [await a.open_stream("download", {"size": 50_000_000}, timeout=T) for _ in range(6)]
        refused_downs = await _settled(downs, 2)
        for s in refused_downs:
            with pytest.raises(SwarmdError) as ei:
                await s.result()
            assert ei.value.code == ERR_OVERLOADED and "max_stream_buffer" in ei.value.message
        assert await a.call("echo", "still here", timeout=T) == "still here"
        # b: uploads into a handler that does not read; two fit what the process has left
        parks = [await b.open_stream("park", None, timeout=T) for _ in range(4)]
        sends = [asyncio.ensure_future(s.send(b"p" * (2 * w))) for s in parks]
        refused = await _settled(parks, 2)
        for s in refused:
            with pytest.raises(SwarmdError) as ei:
                await s.result()
            assert ei.value.code == ERR_OVERLOADED and "max_stream_buffer_total" in ei.value.message
        assert await b.call("echo", "still here", timeout=T) == "still here"
        kept = [s for s in parks if s not in refused]
        async with asyncio.timeout(T):  # the kept uploads fill their windows, not a byte more
            while sum(sum(map(len, ch._chunks)) for p in srv.peers for ch in p.conn._channels.values()) < 2 * w:
                await b.call("ping", timeout=T)
        assert _held_by(srv) <= 6 * w + 6 * mux.STREAM_CHUNK
        # a's streams end: their windows come back, and b may open another
        for s in downs:
            if s not in refused_downs:
                s.abort()
        async with asyncio.timeout(T):
            while sum(len(p.conn._channels) for p in srv.peers) > len(kept):
                await a.call("ping", timeout=T)
        extra = await b.open_stream("upload", timeout=T)
        await extra.send(b"x" * 1000)
        await extra.close()
        assert await extra.result() == 1000
        go.set()  # the parked handlers read now: the kept uploads finish, and each handler counts them
        async with asyncio.timeout(T):
            await asyncio.gather(*(t for s, t in zip(parks, sends, strict=True) if s in kept))
        for s in kept:
            await s.close()
            assert await s.result() == 2 * w
        assert not a.is_closed and not b.is_closed
    finally:
        for t in sends:
            t.cancel()
        go.set()
        await a.close()
        await b.close()
        await srv.stop()


async def test_one_address_holds_at_most_its_share_of_the_stream_buffers() -> None:
    """Many connections (or keys) from one address cannot take the whole process's stream windows:
    they share max_stream_buffer_per_address, refused streams fail alone, the connections stay."""
    w = mux.INITIAL_WINDOW
    cfg = RpcConfig()
    cfg.net.max_stream_buffer_per_address = 3 * w
    go = asyncio.Event()
    methods = make_methods()

    async def park(ctx: CallContext, params: Any, stream: Stream) -> int:
        await go.wait()
        return 0

    methods.register_stream("park", park)
    srv = RpcServer(Identity.generate(), methods, config=cfg)
    await srv.start()
    a = await connect(None, "127.0.0.1", srv.port, timeout=T)
    b = await connect(None, "127.0.0.1", srv.port, timeout=T)  # another key, the same address
    try:
        held = [await a.open_stream("park", None, timeout=T) for _ in range(3)]
        refused = [await p.open_stream("park", None, timeout=T) for p in (a, b)]
        for s in refused:
            with pytest.raises(SwarmdError) as ei:
                await asyncio.wait_for(s.result(), T)
            assert ei.value.code == ERR_OVERLOADED and "max_stream_buffer_per_address" in ei.value.message
        assert await b.call("echo", "still here", timeout=T) == "still here"
        held[0].abort()  # a window comes back to the address, and b may use it
        async with asyncio.timeout(T):
            while sum(len(p.conn._channels) for p in srv.peers) > 2:
                await a.call("ping", timeout=T)
        extra = await b.open_stream("upload", timeout=T)
        await extra.close()
        assert await extra.result() == 0
    finally:
        go.set()
        await a.close()
        await b.close()
        await srv.stop()


def test_recv_window_grows_for_a_bulk_reader_only() -> None:
    w = mux.RecvWindow()
    assert w.growth(8 * mux.INITIAL_WINDOW) == 0  # nothing read yet
    for _ in range(2 * mux.INITIAL_WINDOW // 65536):
        w.received(65536)
        w.consume(65536)
    extra = w.growth(8 * mux.INITIAL_WINDOW)
    assert extra == mux.INITIAL_WINDOW  # doubles
    allowed = w.allowed
    assert w.grow(extra) == extra and w.window == 2 * mux.INITIAL_WINDOW and w.allowed == allowed + extra
    assert w.growth(8 * mux.INITIAL_WINDOW) == 0  # needs two (new) windows read again
    assert mux.RecvWindow(8 * mux.INITIAL_WINDOW).growth(8 * mux.INITIAL_WINDOW) == 0  # at the limit


async def test_a_bulk_stream_window_grows_within_the_caps_and_is_given_back(server: RpcServer) -> None:
    """A long download's receive window doubles up to max_stream_window, never past half of
    max_stream_buffer; the peer uses the extra credit (more than 1 MiB in flight) and every byte
    arrives; the window counts against the process's stream buffer total until the stream ends."""
    from swarmd.net.peerlimits import stream_windows

    w = mux.INITIAL_WINDOW
    cfg = RpcConfig()
    cfg.net.max_stream_window = 8 * w
    cfg.net.max_stream_buffer = 8 * w  # growth stops at half of it: 4 MiB
    peer = await connect(None, "127.0.0.1", server.port, config=cfg, timeout=T)
    try:
        s = await peer.open_stream("download", {"size": 40 * w, "chunk": 65536}, timeout=T)
        ch = s.channel
        got, most_buffered = 0, 0
        while (chunk := await s.recv()) is not None:
            got += len(chunk)
            most_buffered = max(most_buffered, sum(map(len, ch._chunks)))
            if got == 20 * w:  # stop reading a while: the sender fills whatever credit it holds
                for _ in range(200):
                    await peer.call("ping", timeout=T)
        assert got == 40 * w and await s.result() == 40 * w
        assert ch._window.window == 4 * w, ch._window.window
        assert most_buffered > w  # the extra credit was granted and used
        assert peer.conn._channels == {}
    finally:
        await peer.close()
    # the server side: an upload into it grows there too and gives its window back to the process total
    before = stream_windows.total
    peer = await connect(None, "127.0.0.1", server.port, timeout=T)
    try:
        up = await peer.open_stream("upload", timeout=T)
        for _ in range(40):
            await up.send(b"u" * w)
        await up.close()
        assert await up.result() == 40 * w
        async with asyncio.timeout(T):
            while stream_windows.total != before:
                await peer.call("ping", timeout=T)
    finally:
        await peer.close()
