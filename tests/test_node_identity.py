import os
import stat

import pytest

from swarmd.errors import ERR_CONFIG, SwarmdError
from swarmd.node.identity import Identity, ed25519_pk_to_x25519, verify


def test_key_created_0600_and_persists(tmp_path):
    path = tmp_path / "d" / "identity.key"
    a = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    b = Identity.load_or_create(path)
    assert a.public_key == b.public_key and len(a.public_key) == 32


def test_loose_permissions_refused(tmp_path):
    path = tmp_path / "identity.key"
    Identity.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(SwarmdError) as ei:
        Identity.load_or_create(path)
    assert ei.value.code == ERR_CONFIG
    assert "chmod 600" in ei.value.message


@pytest.mark.parametrize("content", [b"", b"zz" * 32, b"ab" * 31, b"\xff\xfe\x00"])
def test_malformed_key_file_refused(tmp_path, content):
    path = tmp_path / "identity.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(SwarmdError) as ei:
        Identity.load(path)
    assert "identity.key" in ei.value.message


def test_sign_verify_and_noise_keys():
    ident = Identity.generate()
    sig = ident.sign(b"hello")
    assert verify(ident.public_key, b"hello", sig)
    assert not verify(ident.public_key, b"hellO", sig)
    assert not verify(ident.public_key[:31], b"hello", sig)
    assert ident.noise_public == ed25519_pk_to_x25519(ident.public_key)
    # the X25519 private key matches its public key
    import nacl.bindings

    assert nacl.bindings.crypto_scalarmult_base(ident.noise_private) == ident.noise_public
