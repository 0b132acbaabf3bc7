"""Names, versions, tags and digests that become file names or keys are matched whole:
`re.match` with `$` also accepts a trailing newline ("model\\n" passed every check)."""

from __future__ import annotations

import pytest

from swarmd.errors import ERR_BAD_REQUEST, SwarmdError
from swarmd.gateway import local
from swarmd.rpc import params
from swarmd.store import blobs, catalog

CHECKS = [
    (catalog.check_name, "model\n"),
    (catalog.check_version, "1.0\n"),
    (lambda v: catalog.check_tags([v]), "prod\n"),
    (blobs.check_digest, "a" * 64 + "\n"),
    (lambda v: local.check_name("model", v), "model\n"),
    (lambda v: params.check_tags([v], "registerThing"), "prod\n"),
]


@pytest.mark.parametrize(("check", "value"), CHECKS)
def test_trailing_newline_is_refused(check, value) -> None:
    with pytest.raises(SwarmdError) as e:
        check(value)
    assert e.value.code == ERR_BAD_REQUEST
    check(value.rstrip("\n"))  # the same value without it is fine
