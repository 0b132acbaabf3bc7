"""Names, versions, tags and digests that become file names or keys are matched whole:
`re.match` with `$` also accepts a trailing newline ("model\\n" passed every check)."""

from __future__ import annotations

import pytest

from swarmd import names
from swarmd.errors import ERR_BAD_REQUEST, SwarmdError
from swarmd.rpc import params

CHECKS = [
    (names.check_name, "model\n"),
    (names.check_version, "1.0\n"),
    (lambda v: names.check_tags([v]), "prod\n"),
    (names.check_digest, "a" * 64 + "\n"),
    (lambda v: params.check_tags([v], "registerThing"), "prod\n"),
]


@pytest.mark.parametrize(("check", "value"), CHECKS)
def test_trailing_newline_is_refused(check, value) -> None:
    with pytest.raises(SwarmdError) as e:
        check(value)
    assert e.value.code == ERR_BAD_REQUEST
    check(value.rstrip("\n"))  # the same value without it is fine


@pytest.mark.parametrize("fields", [
    {"name": "m\n"}, {"name": "m", "version": "latest"}, {"name": "m", "version": 3},
    {"name": "m", "tags": ["has space"]}, {"name": "m", "description": 5},
])
def test_gateway_uploads_follow_the_stores_rules(fields) -> None:
    """A name, version, tag or description a store would refuse is refused by the gateway before the body is kept."""
    from swarmd.gateway.v1_routes import V1Routes

    with pytest.raises(SwarmdError) as e:
        V1Routes._upload_fields(fields, fields.get("tags"))
    assert e.value.code == ERR_BAD_REQUEST
    assert V1Routes._upload_fields({"name": "m", "version": "1.0+cpu"}, "b,a") == ("m", "1.0+cpu", "", ["a", "b"])
