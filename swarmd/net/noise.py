"""The secure session: a Noise handshake, then an encrypted byte stream (sans-IO).

`NoiseSession` owns no socket: feed it the bytes that arrived with
`receive()`, write out the bytes it returns, seal outgoing data with
`encrypt()`. The wire format is specified in docs/protocol.md; in short:

- the initiator's first frame starts with a cleartext header
  ``u8 len | protocol id ("swarmd/1") | u8 pattern (1 = IK, 2 = XX)`` that is
  also the Noise prologue, so a peer speaking another version rejects us with a
  readable reason before any cryptography, and a tampered header breaks the
  handshake;
- IK is used when the initiator knows the responder's Ed25519 key (the normal
  case: keys come from DHT records), XX otherwise;
- every handshake payload that travels with a static key carries the sender's
  Ed25519 public key and its signature over the X25519 static key, and the
  receiver checks that the X25519 key is exactly the conversion of that
  Ed25519 key. Both sides thus end up knowing the other's Ed25519 identity;
- after the handshake each frame is one Noise transport message. We encrypt
  with `cryptography`'s ChaCha20Poly1305 directly with the Noise cipher keys
  and nonces (identical bytes to noiseprotocol's, one Python layer fewer).
"""

from __future__ import annotations

import functools
import struct
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from noise.backends.default.keypairs import KeyPair25519
from noise.connection import Keypair, NoiseConnection

from swarmd.errors import ERR_HANDSHAKE, ERR_PROTOCOL, SwarmdError
from swarmd.net.framing import FrameDecoder, FrameTooLarge, encode_frame
from swarmd.node.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, ed25519_pk_to_x25519, verify

PROTOCOL_ID = b"swarmd/1"
MAX_NOISE_MESSAGE = 65535  # Noise spec limit on one message, tag included
TAG_SIZE = 16
MAX_PLAINTEXT = MAX_NOISE_MESSAGE - TAG_SIZE  # 65519
MAX_HANDSHAKE_FRAME = 1024

PATTERN_IK = 1
PATTERN_XX = 2
_PATTERN_NAMES = {
    PATTERN_IK: b"Noise_IK_25519_ChaChaPoly_BLAKE2s",
    PATTERN_XX: b"Noise_XX_25519_ChaChaPoly_BLAKE2s",
}

HS_NOISE = 0  # handshake frame kinds sent after the first frame
HS_REJECT = 1

KEY_BINDING_CONTEXT = b"swarmd/1 noise static key\x00"
_PAYLOAD_SIZE = PUBLIC_KEY_SIZE + SIGNATURE_SIZE
_NONCE = struct.Struct("<4xQ")  # ChaChaPoly: 32 zero bits, 64-bit little-endian counter
_NONCE_AESGCM = struct.Struct(">4xQ")  # AESGCM: 32 zero bits, 64-bit big-endian counter (Noise spec)
_LEN = struct.Struct(">I")
_MAX_NONCE = 2**64 - 1
# bound once: the small-message paths below run twice per RPC round trip on each side
_pack_len = _LEN.pack
_unpack_len = _LEN.unpack_from
_WHOLE_MAX = 4 + MAX_NOISE_MESSAGE  # one framed transport message, at most


class HandshakeError(SwarmdError):
    """The handshake failed; `reply` holds bytes worth sending the peer before closing."""

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(ERR_HANDSHAKE, message)
        self.reply = reply


@functools.lru_cache(maxsize=64)
def identity_payload(identity: Identity) -> bytes:
    """Ed25519 public key + its signature over our X25519 static key (deterministic:
    signed once per identity, not per handshake)."""
    return identity.public_key + identity.sign(KEY_BINDING_CONTEXT + identity.noise_public)


@functools.lru_cache(maxsize=64)
def _static_keypair(identity: Identity) -> Any:
    """Our Noise static key pair, built once per identity (its public half is a scalar
    multiplication the noise package would redo on every handshake)."""
    return KeyPair25519.from_private_bytes(identity.noise_private)


_CHECKED: dict[bytes, None] = {}  # payload + remote static of bindings already verified, oldest first
_MAX_CHECKED = 4096


def check_identity_payload(payload: bytes, remote_static: bytes) -> bytes:
    """Return the Ed25519 key carried by payload after checking it owns remote_static.
    A binding verified before (the same bytes: a peer reconnecting) is not verified again."""
    if len(payload) != _PAYLOAD_SIZE:
        raise HandshakeError(f"identity payload is {len(payload)} bytes, expected {_PAYLOAD_SIZE}")
    ed_pk, sig = payload[:PUBLIC_KEY_SIZE], payload[PUBLIC_KEY_SIZE:]
    seen = bytes(payload) + bytes(remote_static)
    if seen in _CHECKED:
        return bytes(ed_pk)
    try:
        derived = ed25519_pk_to_x25519(ed_pk)
    except Exception:
        raise HandshakeError("identity payload carries an invalid Ed25519 public key") from None
    if derived != remote_static:
        raise HandshakeError("the peer's Noise static key is not derived from the Ed25519 key it claims")
    if not verify(ed_pk, KEY_BINDING_CONTEXT + remote_static, sig):
        raise HandshakeError("the peer's signature binding its Ed25519 key to its Noise key is invalid")
    if len(_CHECKED) >= _MAX_CHECKED:
        _CHECKED.pop(next(iter(_CHECKED)))
    _CHECKED[seen] = None
    return bytes(ed_pk)


def _header(protocol_id: bytes, pattern: int) -> bytes:
    return bytes([len(protocol_id)]) + protocol_id + bytes([pattern])


def reject_frame(reason: str) -> bytes:
    """A cleartext refusal the responder sends instead of a handshake message."""
    return encode_frame(bytes([HS_REJECT]) + reason.encode()[:512])


class NoiseSession:
    """One side of a secure channel, from first byte to transport messages."""

    def __init__(
        self,
        identity: Identity,
        *,
        initiator: bool,
        remote_public_key: bytes | None = None,
        protocol_id: bytes = PROTOCOL_ID,
        upgrade: bool = True,
    ) -> None:
        if not 0 < len(protocol_id) < 256:
            raise ValueError("protocol_id must be 1..255 bytes")
        if remote_public_key is not None and len(remote_public_key) != PUBLIC_KEY_SIZE:
            raise ValueError(f"remote_public_key must be {PUBLIC_KEY_SIZE} bytes")
        if remote_public_key is not None and not initiator:
            raise ValueError("only the initiator can expect a key up front")
        self.identity = identity
        self.initiator = initiator
        self.protocol_id = protocol_id
        self.expected_key = remote_public_key
        self.remote_public_key: bytes | None = None
        self.established = False
        self.pattern = (PATTERN_IK if remote_public_key is not None else PATTERN_XX) if initiator else 0
        self._noise: NoiseConnection | None = None
        self._hs: Any = None
        self._step = 0
        # one decoder for the whole session: transport frames may follow the last
        # handshake frame in the same read; handshake frames are checked for size apart
        self._frames = FrameDecoder(MAX_NOISE_MESSAGE)
        self._enc: Any = None  # ChaCha20Poly1305, AESGCM after the transport upgrade
        self._dec: Any = None
        self._seal_one: Any = None  # self._enc.encrypt, bound once (and again at the upgrade)
        self._open_one: Any = None  # self._dec.decrypt
        self._n_enc = 0
        self._n_dec = 0
        self._pack_enc = _NONCE.pack
        self._pack_dec = _NONCE.pack
        self._k_enc = b""  # the Noise Split() keys, for Rekey() at the upgrade
        self._k_dec = b""
        # transport cipher upgrade (docs/protocol.md §3): we offer AES-256-GCM with an empty
        # first transport message; the peer's offer sets _upgrade_send (our next message is the
        # switch marker), its marker moves our receiving side
        self.upgrade = upgrade
        self._peer_offered = False
        self._upgrade_send = False
        self.cipher_send = "ChaChaPoly"
        self.cipher_recv = "ChaChaPoly"
        self.handshake_hash = b""

    # -- handshake ---------------------------------------------------------

    def _new_noise(self, pattern: int, initiator: bool) -> NoiseConnection:
        conn = NoiseConnection.from_name(_PATTERN_NAMES[pattern])
        conn.set_prologue(_header(self.protocol_id, pattern))
        if initiator:
            conn.set_as_initiator()
        else:
            conn.set_as_responder()
        conn.noise_protocol.keypairs["s"] = _static_keypair(self.identity)  # what set_keypair_from_private_bytes sets
        if pattern == PATTERN_IK and initiator:
            assert self.expected_key is not None
            conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, ed25519_pk_to_x25519(self.expected_key))
        conn.start_handshake()
        self._hs = conn.noise_protocol.handshake_state
        return conn

    def start(self) -> bytes:
        """Initiator only: the first bytes to write on the pipe."""
        if not self.initiator or self._noise is not None:
            raise RuntimeError("start() is called once, by the initiator")
        self._noise = self._new_noise(self.pattern, True)
        payload = identity_payload(self.identity) if self.pattern == PATTERN_IK else b""
        msg = self._noise.write_message(payload)
        self._step = 1
        return encode_frame(_header(self.protocol_id, self.pattern) + bytes(msg))

    def _remote_static(self) -> bytes:
        rs = self._hs.rs
        return rs.public_bytes if rs is not None else b""

    def _finish(self) -> bytes:
        """Keys from Split(); returns the first transport message to send: the upgrade offer
        (an empty message), or nothing when this session does not offer."""
        assert self._noise is not None
        proto = self._noise.noise_protocol
        self.handshake_hash = bytes(self._noise.get_handshake_hash())
        self._k_enc = bytes(proto.cipher_state_encrypt.k)
        self._k_dec = bytes(proto.cipher_state_decrypt.k)
        self._enc = ChaCha20Poly1305(self._k_enc)
        self._dec = ChaCha20Poly1305(self._k_dec)
        self._seal_one = self._enc.encrypt
        self._open_one = self._dec.decrypt
        self._noise = None
        self._hs = None
        self.established = True
        return self.encrypt(b"") if self.upgrade else b""

    def _upgrade_marker(self) -> bytes:
        """Our switch marker (the last ChaChaPoly message of this direction), then switch the
        sending side to AES-256-GCM under Rekey(k) with the counter back at 0."""
        self._upgrade_send = False
        marker = self.encrypt(b"")
        self._enc = AESGCM(_rekey(self._k_enc))
        self._seal_one = self._enc.encrypt
        self._pack_enc = _NONCE_AESGCM.pack
        self._n_enc = 0
        self.cipher_send = "AESGCM"
        return marker

    def _on_empty(self, nonce: int) -> None:
        """An empty transport message from the peer (it carries no bytes for the stream):
        its upgrade offer when it is the peer's first message, its switch marker when the
        peer offered earlier; ignored otherwise (after the switch, or when we did not offer)."""
        if self.cipher_recv != "ChaChaPoly" or not self.upgrade:
            return
        if nonce == 0:
            self._peer_offered = True
            self._upgrade_send = True
        elif self._peer_offered:
            self._dec = AESGCM(_rekey(self._k_dec))
            self._open_one = self._dec.decrypt
            self._pack_dec = _NONCE_AESGCM.pack
            self._n_dec = 0
            self.cipher_recv = "AESGCM"

    def _handshake_frame(self, frame: bytes) -> bytes:
        """Consume one handshake frame, return bytes to send."""
        if self.initiator:
            return self._initiator_frame(frame)
        return self._responder_frame(frame)

    def _responder_frame(self, frame: bytes) -> bytes:
        if self._step == 0:
            if not frame:
                raise HandshakeError("empty first handshake frame")
            n = frame[0]
            if len(frame) < 2 + n:
                raise HandshakeError("first handshake frame too short for its protocol header")
            proto, pattern = frame[1 : 1 + n], frame[1 + n]
            if proto != self.protocol_id:
                shown = proto.decode("ascii", "replace")[:64]
                reason = (
                    f"protocol {shown!r} is not supported; this node speaks {self.protocol_id.decode()!r}"
                )
                raise HandshakeError(reason, reject_frame(reason))
            if pattern not in _PATTERN_NAMES:
                reason = f"unknown handshake pattern {pattern}; expected 1 (IK) or 2 (XX)"
                raise HandshakeError(reason, reject_frame(reason))
            self.pattern = pattern
            self._noise = self._new_noise(pattern, False)
            try:
                payload = self._noise.read_message(frame[2 + n :])
            except Exception as e:  # hostile bytes can raise anything inside noiseprotocol
                reason = (
                    "handshake message does not decrypt with this node's key (dialled the wrong public key?)"
                    if pattern == PATTERN_IK
                    else f"malformed handshake message: {e}"
                )
                raise HandshakeError(reason, reject_frame(reason)) from None
            if pattern == PATTERN_IK:
                try:
                    self.remote_public_key = check_identity_payload(bytes(payload), self._remote_static())
                except HandshakeError as e:
                    raise HandshakeError(e.message, reject_frame(e.message)) from None
            reply = self._noise.write_message(identity_payload(self.identity))
            out = encode_frame(bytes([HS_NOISE]) + bytes(reply))
            self._step = 1
            if pattern == PATTERN_IK:
                out += self._finish()
            return out
        # XX message 3
        if frame[:1] != bytes([HS_NOISE]):
            raise HandshakeError("expected the third handshake message")
        hs = self._hs
        try:
            payload = self._noise.read_message(frame[1:])  # type: ignore[union-attr]
        except Exception as e:  # hostile bytes can raise anything inside noiseprotocol
            raise HandshakeError(f"malformed third handshake message: {e}") from None
        rs = hs.rs.public_bytes if hs.rs is not None else b""
        self.remote_public_key = check_identity_payload(bytes(payload), rs)
        return self._finish()

    def _initiator_frame(self, frame: bytes) -> bytes:
        if self._step != 1:
            raise HandshakeError("unexpected handshake frame")
        kind = frame[:1]
        if kind == bytes([HS_REJECT]):
            reason = frame[1:].decode("utf-8", "replace")
            raise HandshakeError(f"peer rejected the handshake: {reason}")
        if kind != bytes([HS_NOISE]):
            raise HandshakeError("peer answered with an unknown handshake frame (not a swarmd/1 peer?)")
        assert self._noise is not None
        try:
            payload = self._noise.read_message(frame[1:])
        except Exception as e:  # hostile bytes can raise anything inside noiseprotocol
            raise HandshakeError(f"malformed handshake reply: {e}") from None
        rs = self._remote_static()
        key = check_identity_payload(bytes(payload), rs)
        if self.expected_key is not None and key != self.expected_key:
            raise HandshakeError("peer's key is not the expected public key")
        self.remote_public_key = key
        out = b""
        if self.pattern == PATTERN_XX:
            msg = self._noise.write_message(identity_payload(self.identity))
            out = encode_frame(bytes([HS_NOISE]) + bytes(msg))
        return out + self._finish()

    # -- data --------------------------------------------------------------

    def receive(self, data: bytes) -> tuple[bytes, list[bytes]]:
        """Feed received bytes; returns (bytes to send, decrypted transport plaintexts).

        Raises HandshakeError during the handshake, SwarmdError(ERR_PROTOCOL /
        ERR_TOO_LARGE) afterwards; the caller closes the pipe either way.
        """
        if not self.established:
            return self._receive_handshake(data)
        return b"", self.decrypt_stream(data)

    def decrypt_stream(self, data: bytes) -> list[bytes]:
        """Established sessions only: the plaintexts of the transport messages completed by data."""
        if not self._frames._buf:
            # fast path: a read holding exactly one whole message (a call, an answer)
            size = len(data)
            if 4 < size <= _WHOLE_MAX and _unpack_len(data)[0] == size - 4:
                nonce = self._n_dec
                try:
                    plain = self._open_one(self._pack_dec(nonce), data[4:], None)
                except InvalidTag:
                    raise SwarmdError(ERR_PROTOCOL, "a transport message failed authentication") from None
                self._n_dec = nonce + 1
                if not plain:
                    self._on_empty(nonce)
                    return []
                return [plain]
        return self._decrypt_frames(self._frames.feed(data))

    def _receive_handshake(self, data: bytes) -> tuple[bytes, list[bytes]]:
        if self.initiator and self._step == 0:
            raise RuntimeError("call start() before receive()")
        try:
            frames = self._frames.feed(data)
        except FrameTooLarge as e:
            raise HandshakeError(
                f"handshake frame of {e.size} bytes announced, at most {MAX_HANDSHAKE_FRAME} expected "
                "(not a swarmd peer?)"
            ) from None
        out = []
        for i, frame in enumerate(frames):
            if self.established:
                # transport messages that followed the last handshake message
                return b"".join(out), self._decrypt_frames(frames[i:])
            if len(frame) > MAX_HANDSHAKE_FRAME:
                raise HandshakeError(
                    f"handshake frame of {len(frame)} bytes, at most {MAX_HANDSHAKE_FRAME} expected"
                )
            out.append(self._handshake_frame(bytes(frame)))
        if not self.established:
            self._check_partial_handshake_frame()
        return b"".join(out), []

    def _check_partial_handshake_frame(self) -> None:
        """Refuse at once a half-received handshake frame announced over 1 KiB.

        The shared decoder allows 64 KiB (transport frames may follow the last
        handshake frame in one read), so without this an unauthenticated peer
        could park 64 KiB per connection until the handshake timeout.
        """
        held = self._frames._buf
        if len(held) >= 4:
            n = int.from_bytes(held[:4], "big")
            if n > MAX_HANDSHAKE_FRAME:
                raise HandshakeError(
                    f"handshake frame of {n} bytes announced, at most {MAX_HANDSHAKE_FRAME} expected "
                    "(not a swarmd peer?)"
                )

    def discard_buffered(self) -> None:
        """Drop a partly received message (up to 64 KiB); for a connection being torn down."""
        self._frames = FrameDecoder(MAX_NOISE_MESSAGE)

    def _decrypt_frames(self, frames: list[bytes | memoryview]) -> list[bytes]:
        dec = self._dec
        assert dec is not None
        out = []
        n = self._n_dec
        pack = self._pack_dec
        for frame in frames:
            try:
                plain = dec.decrypt(pack(n), frame, None)
            except InvalidTag:
                raise SwarmdError(ERR_PROTOCOL, "a transport message failed authentication") from None
            n += 1
            if plain:
                out.append(plain)
                continue
            self._n_dec = n
            self._on_empty(n - 1)  # may switch the receiving cipher for the messages after it
            dec, pack, n = self._dec, self._pack_dec, self._n_dec
        if n >= _MAX_NONCE:
            raise SwarmdError(ERR_PROTOCOL, "receive nonce exhausted")
        self._n_dec = n
        return out

    def encrypt(self, plaintext: bytes) -> bytes:
        """Seal plaintext into one or more framed transport messages."""
        if self._upgrade_send:
            return self._upgrade_marker() + self.encrypt(plaintext)
        seal_one = self._seal_one
        if seal_one is None:
            raise RuntimeError("encrypt() before the handshake finished")
        size = len(plaintext)
        if size <= MAX_PLAINTEXT:
            n = self._n_enc
            ct = seal_one(self._pack_enc(n), plaintext, None)
            self._n_enc = n + 1
            return _pack_len(size + TAG_SIZE) + ct
        return bytes(self.seal([plaintext]))

    def seal_frames(self, pieces: list[bytes | memoryview]) -> list[bytes]:
        """Seal mux frames, given as (header, payload) pairs of pieces, for a vectored write.

        Whole frames are packed into each transport message, and a frame that does not fit
        in what is left of one starts the next, so a stream frame (at most one message, see
        mux.STREAM_CHUNK) never straddles two messages and the receiver takes its payload
        out of one decrypted message without re-buffering it. (Joining everything and
        cutting it every 65,519 bytes, as seal does, splits every frame after the first
        short one.) Returns the wire pieces, length prefix and ciphertext alternately, each
        its own buffer of at most 64 KiB: no multi-megabyte buffer is allocated, zeroed and
        faulted in per flush. A frame larger than one message (never a stream frame) is
        split across messages.
        """
        out: list[bytes] = [self._upgrade_marker()] if self._upgrade_send else []
        enc = self._enc
        if enc is None:
            raise RuntimeError("seal_frames() before the handshake finished")
        append = out.append
        n = self._n_enc
        nonce = self._pack_enc
        prefix = _LEN.pack
        cur: list[bytes | memoryview] = []
        size = 0
        for i in range(0, len(pieces), 2):
            head = pieces[i]
            body = pieces[i + 1]
            flen = len(head) + len(body)
            if size + flen > MAX_PLAINTEXT and size:
                append(prefix(size + TAG_SIZE))
                append(enc.encrypt(nonce(n), cur[0] if len(cur) == 1 else b"".join(cur), None))
                n += 1
                cur = []
                size = 0
            if flen > MAX_PLAINTEXT:
                whole = memoryview(b"".join((head, body)))
                for start in range(0, flen, MAX_PLAINTEXT):
                    chunk = whole[start : start + MAX_PLAINTEXT]
                    append(prefix(len(chunk) + TAG_SIZE))
                    append(enc.encrypt(nonce(n), chunk, None))
                    n += 1
                continue
            cur.append(head)
            if body:
                cur.append(body)
            size += flen
        if size:
            append(prefix(size + TAG_SIZE))
            append(enc.encrypt(nonce(n), cur[0] if len(cur) == 1 else b"".join(cur), None))
            n += 1
        if n >= _MAX_NONCE:
            raise SwarmdError(ERR_PROTOCOL, "send nonce exhausted")
        self._n_enc = n
        return out

    def seal(self, plaintexts: list[bytes]) -> bytearray:
        """Seal several plaintexts, each starting a new transport message, into one buffer.

        Starting each plaintext on a message boundary lets the sender keep bulk
        stream frames aligned with Noise messages, so the receiver parses them
        without re-buffering. Encrypts in place (encrypt_into): one output copy.
        """
        marker = self._upgrade_marker() if self._upgrade_send else b""
        enc = self._enc
        if enc is None:
            raise RuntimeError("seal() before the handshake finished")
        total = len(marker)
        for p in plaintexts:
            size = len(p)
            total += size + (-(-size // MAX_PLAINTEXT)) * (4 + TAG_SIZE)
        out = bytearray(total)
        mv = memoryview(out)
        out[: len(marker)] = marker
        off = len(marker)
        n = self._n_enc
        pack = self._pack_enc
        for p in plaintexts:
            pv = memoryview(p)
            size = len(pv)
            for start in range(0, size, MAX_PLAINTEXT):
                chunk = pv[start : start + MAX_PLAINTEXT]
                clen = len(chunk) + TAG_SIZE
                out[off : off + 4] = clen.to_bytes(4, "big")
                enc.encrypt_into(pack(n), chunk, None, mv[off + 4 : off + 4 + clen])
                off += 4 + clen
                n += 1
        mv.release()
        if n >= _MAX_NONCE:
            raise SwarmdError(ERR_PROTOCOL, "send nonce exhausted")
        self._n_enc = n
        return out


def _rekey(k: bytes) -> bytes:
    """Noise's REKEY(k): the first 32 bytes of ENCRYPT(k, 2^64 - 1, empty ad, 32 zero bytes),
    ChaChaPoly; the nonce 2^64 - 1 is never used for a transport message."""
    return ChaCha20Poly1305(k).encrypt(_NONCE.pack(_MAX_NONCE), bytes(32), None)[:32]
