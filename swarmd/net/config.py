"""Settings of the secure, multiplexed connection layer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class NetConfig:
    """Limits and timers of one connection; the defaults suit loopback and WAN alike."""

    handshake_timeout: float = 10.0  # seconds from pipe open to an established session
    keepalive_interval: float = 15.0  # send a PING after this much silence from the peer
    idle_timeout: float = 45.0  # close after this much silence (PINGs unanswered)
    max_message_size: int = 32 << 20  # largest mux frame, i.e. RPC message (tensors included); blobs go in streams
    max_streams: int = 256  # concurrent stream channels per connection
    # stream data one connection may make us hold: each open stream holds at most one flow-control
    # window (1 MiB) of unread bytes each way, so a stream past this many bytes of windows is refused
    # with ERR_OVERLOADED (that request fails, the connection stays)
    max_stream_buffer: int = 16 << 20
    # the same across the streams peers opened on all connections of the process (a peer cannot pin
    # more by opening more connections); a stream past it is refused with ERR_OVERLOADED
    max_stream_buffer_total: int = 256 << 20
    # the share of that total the connections from one IP address may hold (relayed peers share
    # their relay's), so one address with many keys and connections cannot refuse everyone else
    max_stream_buffer_per_address: int = 64 << 20
    # a bulk stream's receive window doubles (from mux.INITIAL_WINDOW, 1 MiB) while its reader keeps
    # reading, up to this and to half of max_stream_buffer; 1048576 keeps every window at 1 MiB
    max_stream_window: int = 8 << 20
    write_high_water: int = 4 << 20  # pipe buffer above which stream senders wait
    write_low_water: int = 1 << 20  # stream senders resume once the buffer drains below this
    # hard cap on bytes queued for a peer that does not read (its PINGs, error replies to
    # its requests, answers still owed): beyond it the connection is closed, never grown
    max_write_buffer: int = 64 << 20
    # half-received frames held across all connections of the process; past it, a connection
    # holding a partial frame of 1 MiB or more is closed (many peers each stopping mid-frame)
    max_partial_total: int = 512 << 20
    close_grace: float = 5.0  # seconds a closing pipe may take to flush before it is aborted
    # calls/answers queued in one loop iteration that are written at once instead of at its end:
    # with many calls in flight the peer starts on the first ones while this side prepares the
    # rest, so both processes work at the same time instead of taking turns (0: one write at the
    # end of the iteration). 64 in flight, quiet 2-core machine: 80k -> 149k req/s with 16; with
    # busy-polling on, 32 beat 16 in three A/B runs (e.g. 179.8k vs 154.1k req/s, CPU per call
    # 10.8 vs 12.4 us) and left gateway -> worker even (docs/benchmarks.md, issue 19)
    flush_frames: int = 32
    # after a write, keep the event loop polling (not sleeping) for up to this many microseconds
    # while this connection's peer has been answering within that time (net/busypoll.py): saves
    # the wake-up from idle, which on a VM that halts idle vCPUs is most of a quick call's round
    # trip, at the cost of CPU spent polling (only while the cores are not busy with other work);
    # 0 never polls. 1000 us also covers a worker's wait for a gateway's next request at one
    # connection (the client's and the gateway's turn, ~0.5 ms): gateway -> worker at 1
    # connection, five same-run A/Bs against 100 us, -5% to +30% req/s (median +7%; 64
    # connections even); 100 us fits only a quick call's round trip, 50 not even that on the
    # asyncio loop (docs/benchmarks.md, issue 19)
    busy_poll_us: int = 1000
    # after a write that leaves calls of ours awaiting their answers on this connection, poll for
    # up to this many microseconds instead (at least busy_poll_us; same adaptive rule): a gateway
    # waiting for a worker's model run polls through it. Gateway -> worker at 1 connection, same
    # run: 957 vs 846 req/s with 1 ms, 956 with 2 ms, the gateway spending its wait polling
    # (docs/benchmarks.md, issue 19)
    busy_poll_answer_us: int = 2000
