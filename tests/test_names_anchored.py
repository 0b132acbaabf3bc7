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


GOOD_ROW = {"name": "m", "version": "1", "digest": "a" * 64, "size": 10, "format": "onnx", "tags": ["prod"],
            "description": "", "created": 1.0, "updated": 2.0, "uploader": "ab" * 32}


@pytest.mark.parametrize("bad", [{"name": "m\n"}, {"version": "latest"}, {"digest": "A" * 64}, {"size": -1},
                                 {"size": True}, {"tags": ["a b"]}, {"created": float("nan")}, {"updated": "2"},
                                 {"uploader": "x" * 65}])
def test_worker_and_replication_read_a_stores_record_alike(bad) -> None:
    """One record check (names.check_record): what replication refuses, a worker fetching by it refuses too."""
    from swarmd.errors import ERR_PROTOCOL
    from swarmd.roles.store_replication import meta_from_wire
    from swarmd.worker.fetch import check_metadata

    assert meta_from_wire(GOOD_ROW).tags == ["prod"] and check_metadata(GOOD_ROW, "m").size == 10
    row = {**GOOD_ROW, **bad}
    with pytest.raises(SwarmdError) as e:
        meta_from_wire(row)
    assert e.value.code == ERR_BAD_REQUEST
    with pytest.raises(SwarmdError) as e:
        check_metadata(row, "m")
    assert e.value.code == ERR_PROTOCOL
