"""Secure, multiplexed connections over any byte pipe.

- `framing`: u32 length-prefixed frames, maximum checked before buffering (sans-IO)
- `noise`: `NoiseSession`, the Noise IK/XX handshake binding Ed25519 identities, then
  ChaCha20-Poly1305 transport messages (sans-IO)
- `mux`: frame codec and credit accounting for channels inside the secure stream (sans-IO)
- `connection`: `SecureConnection`, the asyncio glue; an `asyncio.Protocol`, so TCP drives
  it directly and other pipes (hole-punched, relayed) drive it through the same calls
- `tcp`: `dial()` / `listen()` helpers
- `config`: `NetConfig`

The wire format is specified in docs/protocol.md.
"""
