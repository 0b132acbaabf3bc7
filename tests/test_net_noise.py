"""The sans-IO Noise session: IK/XX, key binding, version mismatch, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmd.errors import ERR_HANDSHAKE, ERR_PROTOCOL, ERR_TOO_LARGE, SwarmdError
from swarmd.net.framing import FrameDecoder, encode_frame
from swarmd.net.noise import (
    MAX_PLAINTEXT,
    HandshakeError,
    NoiseSession,
    check_identity_payload,
    identity_payload,
)
from swarmd.node.identity import Identity

A = Identity.from_seed(b"a" * 32)
B = Identity.from_seed(b"b" * 32)
C = Identity.from_seed(b"c" * 32)


def handshake(i: NoiseSession, r: NoiseSession) -> None:
    """Deliver every byte each side returns (handshake messages, then the upgrade offers)."""
    out, _ = r.receive(i.start())
    out2, _ = i.receive(out)
    if out2:
        out3, _ = r.receive(out2)
        if out3:
            i.receive(out3)


@pytest.mark.parametrize("known", [True, False])
def test_both_sides_learn_each_others_ed25519_key(known: bool) -> None:
    i = NoiseSession(A, initiator=True, remote_public_key=B.public_key if known else None)
    r = NoiseSession(B, initiator=False)
    handshake(i, r)
    assert i.established and r.established
    assert i.remote_public_key == B.public_key
    assert r.remote_public_key == A.public_key
    assert i.handshake_hash == r.handshake_hash
    assert i.pattern == r.pattern == (1 if known else 2)
    big = bytes(range(256)) * 1000
    _, plain = r.receive(i.encrypt(big))
    assert b"".join(plain) == big
    _, plain = i.receive(r.encrypt(b"back"))
    assert plain == [b"back"]


def test_interoperates_with_plain_noiseprotocol() -> None:
    """A peer built on the noiseprotocol library alone (as docs/protocol.md describes) talks to us."""
    from noise.connection import Keypair, NoiseConnection

    i = NoiseSession(A, initiator=True)
    first = bytes(FrameDecoder(65535).feed(i.start())[0])
    header = first[: 2 + first[0]]
    assert header == b"\x08swarmd/1\x02"
    raw = NoiseConnection.from_name(b"Noise_XX_25519_ChaChaPoly_BLAKE2s")
    raw.set_prologue(header)
    raw.set_as_responder()
    raw.set_keypair_from_private_bytes(Keypair.STATIC, B.noise_private)
    raw.start_handshake()
    raw.read_message(first[len(header) :])
    reply = encode_frame(b"\x00" + bytes(raw.write_message(identity_payload(B))))
    out, _ = i.receive(reply)
    assert i.remote_public_key == B.public_key
    msg3, offer = (bytes(f) for f in FrameDecoder(65535).feed(out))
    payload = raw.read_message(msg3[1:])
    assert bytes(payload[:32]) == A.public_key
    # our upgrade offer: an empty transport message, which a plain Noise peer reads as nothing
    assert raw.decrypt(offer) == b""
    frames = [
        bytes(f)
        for f in FrameDecoder(65535).feed(i.encrypt(b"first") + i.encrypt(b"x" * (MAX_PLAINTEXT + 1)))
    ]
    assert [len(f) for f in frames] == [5 + 16, 65535, 17]
    assert raw.decrypt(frames[0]) == b"first"
    assert raw.decrypt(frames[1]) + raw.decrypt(frames[2]) == b"x" * (MAX_PLAINTEXT + 1)
    _, plain = i.receive(encode_frame(raw.encrypt(b"back")))
    assert plain == [b"back"]
    # the plain peer never offered, so we never switch: ChaChaPoly both ways
    assert raw.decrypt(bytes(FrameDecoder(65535).feed(i.encrypt(b"still chacha"))[0])) == b"still chacha"
    assert (i.cipher_send, i.cipher_recv) == ("ChaChaPoly", "ChaChaPoly")


@pytest.mark.parametrize("known", [True, False])
@pytest.mark.parametrize(("up_i", "up_r"), [(True, True), (True, False), (False, True)])
def test_transport_upgrade_to_aesgcm_only_when_both_offer(known: bool, up_i: bool, up_r: bool) -> None:
    """Each side offers AES-256-GCM with an empty first transport message; once a side has the
    peer's offer its next message is the switch marker and it sends AES-GCM from then on. A side
    that does not offer (an older peer) keeps both directions on ChaChaPoly. Data sent before,
    across and after the switch, in both directions and in one read, arrives intact."""
    i = NoiseSession(A, initiator=True, remote_public_key=B.public_key if known else None, upgrade=up_i)
    r = NoiseSession(B, initiator=False, upgrade=up_r)
    handshake(i, r)
    both = up_i and up_r
    wire = i.encrypt(b"one") + b"".join(i.seal_frames([b"two", b"x" * 70_000])) + bytes(i.seal([b"three"]))
    assert r.receive(wire)[1] == [b"one", b"two" + b"x" * (MAX_PLAINTEXT - 3), b"x" * (70_003 - MAX_PLAINTEXT), b"three"]
    assert r.receive(i.encrypt(b"more"))[1] == [b"more"]
    _, plain = i.receive(r.encrypt(b"back") + r.encrypt(b"again"))
    assert plain == [b"back", b"again"]
    expected = "AESGCM" if both else "ChaChaPoly"
    assert (i.cipher_send, i.cipher_recv, r.cipher_send, r.cipher_recv) == (expected,) * 4
    if both:  # what travels now is AES-256-GCM under Rekey(k), counter from 0, big-endian nonce
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        from swarmd.net.noise import _rekey

        frame = bytes(FrameDecoder(65535).feed(i.encrypt(b"aes"))[0])
        n = i._n_enc - 1
        assert AESGCM(_rekey(i._k_enc)).decrypt(bytes(4) + n.to_bytes(8, "big"), frame, None) == b"aes"
        assert r.receive(encode_frame(frame))[1] == [b"aes"]


def test_ik_to_the_wrong_key_is_rejected_with_a_reason() -> None:
    i = NoiseSession(A, initiator=True, remote_public_key=C.public_key)
    r = NoiseSession(B, initiator=False)
    with pytest.raises(HandshakeError) as ei:
        r.receive(i.start())
    assert ei.value.code == ERR_HANDSHAKE
    assert "wrong public key" in ei.value.message
    with pytest.raises(HandshakeError) as ei2:
        i.receive(ei.value.reply)
    assert "rejected" in ei2.value.message


def test_xx_to_an_unexpected_key_fails_on_the_initiator() -> None:
    """XX then comparing is how a caller learns it reached someone else."""
    i = NoiseSession(A, initiator=True)
    r = NoiseSession(B, initiator=False)
    handshake(i, r)
    assert i.remote_public_key == B.public_key != C.public_key


def test_version_mismatch_fails_fast_and_clearly() -> None:
    i = NoiseSession(A, initiator=True, remote_public_key=B.public_key, protocol_id=b"swarmd/2")
    r = NoiseSession(B, initiator=False)
    with pytest.raises(HandshakeError) as ei:
        r.receive(i.start())
    assert "swarmd/2" in ei.value.message and "swarmd/1" in ei.value.message
    with pytest.raises(HandshakeError) as ei2:
        i.receive(ei.value.reply)
    assert "swarmd/1" in ei2.value.message


def test_identity_payload_must_match_the_static_key() -> None:
    """A peer cannot claim someone else's Ed25519 key with its own Noise key."""
    with pytest.raises(HandshakeError) as ei:
        check_identity_payload(identity_payload(C), A.noise_public)
    assert "not derived" in ei.value.message
    forged = C.public_key + A.sign(b"anything").ljust(64, b"\0")[:64]
    with pytest.raises(HandshakeError):
        check_identity_payload(forged, C.noise_public)
    assert check_identity_payload(identity_payload(C), C.noise_public) == C.public_key


def test_tampered_transport_message_is_a_protocol_error() -> None:
    i = NoiseSession(A, initiator=True, remote_public_key=B.public_key)
    r = NoiseSession(B, initiator=False)
    handshake(i, r)
    wire = bytearray(i.encrypt(b"payload"))
    wire[-1] ^= 1
    with pytest.raises(SwarmdError) as ei:
        r.receive(bytes(wire))
    assert ei.value.code == ERR_PROTOCOL


def test_transport_frames_after_the_last_handshake_frame_in_one_read() -> None:
    i = NoiseSession(A, initiator=True)
    r = NoiseSession(B, initiator=False)
    out, _ = r.receive(i.start())
    out3, _ = i.receive(out)
    _, plain = r.receive(out3 + i.encrypt(b"early"))
    assert plain == [b"early"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_responder_survives_garbage(data: bytes) -> None:
    r = NoiseSession(B, initiator=False)
    try:
        r.receive(data)
    except SwarmdError as e:
        assert e.code in (ERR_HANDSHAKE, ERR_TOO_LARGE)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_initiator_survives_garbage_replies(body: bytes, framed: bool) -> None:
    i = NoiseSession(A, initiator=True, remote_public_key=B.public_key)
    i.start()
    try:
        i.receive(encode_frame(body) if framed else body)
    except SwarmdError as e:
        assert e.code in (ERR_HANDSHAKE, ERR_TOO_LARGE)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_established_session_survives_garbage(data: bytes) -> None:
    i = NoiseSession(A, initiator=True, remote_public_key=B.public_key)
    r = NoiseSession(B, initiator=False)
    handshake(i, r)
    try:
        _, plain = r.receive(encode_frame(data))
        assert plain == []  # forging a valid message is not possible
    except SwarmdError as e:
        assert e.code in (ERR_PROTOCOL, ERR_TOO_LARGE)


def test_half_sent_oversized_handshake_frame_is_refused_at_once():
    """A first frame announced at 2,000 bytes (over the 1 KiB handshake cap) is refused
    as soon as its length arrives, not after the handshake timeout."""
    import struct

    import pytest as _pytest

    from swarmd.net.noise import HandshakeError, NoiseSession
    from swarmd.node.identity import Identity

    server = NoiseSession(Identity.generate(), initiator=False)
    with _pytest.raises(HandshakeError, match="2000 bytes announced"):
        server.receive(struct.pack(">I", 2000) + b"\x00" * 1000)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, MAX_PLAINTEXT + 9), min_size=1, max_size=12),
    big=st.sampled_from([0, 3 * MAX_PLAINTEXT + 7]),
    cut=st.integers(1, 200_000),
)
def test_seal_frames_keeps_each_frame_whole_in_one_message(sizes: list[int], big: int, cut: int) -> None:
    """seal_frames packs (header, payload) pairs whole into transport messages: the receiver
    gets back the same bytes in order, every frame that fits a message lies inside one, and
    a frame larger than a message is split; read in arbitrary pieces it decrypts the same."""
    from swarmd.net import mux

    i, r = NoiseSession(A, initiator=True, remote_public_key=B.public_key), NoiseSession(B, initiator=False)
    handshake(i, r)
    pieces: list[bytes] = []
    frames: list[bytes] = []
    for k, n in enumerate([*sizes, big] if big else sizes):
        payload = bytes([k % 251]) * max(0, n - mux.HEADER_SIZE)
        head = mux.HEADER.pack(mux.MSG, 1, len(payload))
        pieces += [head, memoryview(payload)] if k % 2 else [head, payload]
        frames.append(head + payload)
    wire = b"".join(i.seal_frames(pieces))
    plains: list[bytes] = []
    for start in range(0, len(wire), cut):
        plains += r.decrypt_stream(wire[start : start + cut])
    assert b"".join(plains) == b"".join(frames)
    assert all(len(p) <= MAX_PLAINTEXT for p in plains)
    pos, ends = 0, set()
    for p in plains:
        pos += len(p)
        ends.add(pos)
    pos = 0
    for f in frames:
        if len(f) <= MAX_PLAINTEXT:  # starts and ends on message boundaries within one message
            first = next(e for e in sorted(ends) if e > pos) if f else pos
            assert pos + len(f) <= first, (pos, len(f))
        pos += len(f)
    # the nonce moved on: a following small message still decrypts
    assert r.decrypt_stream(i.encrypt(b"after")) == [b"after"]
