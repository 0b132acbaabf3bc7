"""A node's identity: one Ed25519 key pair that signs records and, converted to
X25519, serves as the Noise static key. The public key is the node's address.
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.signing

from swarmd.errors import ERR_BAD_REQUEST, ERR_CONFIG, SwarmdError

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64


class IdentityError(SwarmdError):
    def __init__(self, message: str) -> None:
        super().__init__(ERR_CONFIG, message)


def parse_public_key(value: object, what: str = "public key") -> bytes:
    """The one reading of a peer's key from a caller, a config or a peer: 32 bytes, or 64 hex
    digits; ERR_BAD_REQUEST naming `what` otherwise."""
    if isinstance(value, (bytes, bytearray)) and len(value) == PUBLIC_KEY_SIZE:
        return bytes(value)
    try:
        key = bytes.fromhex(value) if isinstance(value, str) and len(value) == 2 * PUBLIC_KEY_SIZE else b""
    except ValueError:
        key = b""
    if len(key) != PUBLIC_KEY_SIZE:
        raise SwarmdError(ERR_BAD_REQUEST,
                          f"{what} must be a 32-byte Ed25519 public key as 64 hex digits, got {value!r:.80}")
    return key


@functools.lru_cache(maxsize=4096)
def ed25519_pk_to_x25519(public_key: bytes) -> bytes:
    """Noise static public key of a peer known by its Ed25519 public key. Cached: every
    handshake converts both sides' keys (a field inversion each), and peers reconnect."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"Ed25519 public key must be 32 bytes, got {len(public_key)}")
    return nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(public_key)


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when signature is public_key's Ed25519 signature over message."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
        return True
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        return False


@dataclass(frozen=True, eq=False)
class Identity:
    """An Ed25519 signing key and the keys derived from it."""

    signing_key: nacl.signing.SigningKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        return cls(nacl.signing.SigningKey(seed))

    @property
    def seed(self) -> bytes:
        return bytes(self.signing_key)

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def public_hex(self) -> str:
        return self.public_key.hex()

    # derived once per identity (a scalar multiplication, an inversion): every handshake reads them
    @functools.cached_property
    def noise_private(self) -> bytes:
        sk = nacl.bindings.crypto_sign_seed_keypair(self.seed)[1]
        return nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(sk)

    @functools.cached_property
    def noise_public(self) -> bytes:
        return ed25519_pk_to_x25519(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

    # -- persistence -------------------------------------------------------

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """Load the key at path, or create it (mode 0600) on first start.

        A key file that group or others can read is refused: anyone who can
        read it can impersonate this node.
        """
        path = Path(path)
        if path.exists():
            return cls.load(path)
        ident = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (ident.seed.hex() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return ident

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            st = path.stat()
        except OSError as e:
            raise IdentityError(f"cannot read key file {path}: {e.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"key file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run 'chmod 600 {path}'"
            )
        try:
            text = path.read_text().strip()
        except OSError as e:
            raise IdentityError(f"cannot read key file {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise IdentityError(f"key file {path} is not text: expected 64 hex characters") from None
        try:
            seed = bytes.fromhex(text)
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise IdentityError(f"key file {path} is malformed: expected 64 hex characters (a 32-byte seed)")
        return cls.from_seed(seed)
