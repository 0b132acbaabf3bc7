"""swarmd.node.address: the one reader of HOST:PORT text and [host, port] pairs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmd.errors import ERR_BAD_REQUEST, ERR_CONFIG, ConfigError, SwarmdError
from swarmd.node.address import MAX_HOST, format_hostport, parse_address, parse_hostport


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("localhost:1", ("localhost", 1)),
        ("node-1.example_lab.internal:65535", ("node-1.example_lab.internal", 65535)),
        ("[::1]:5000", ("::1", 5000)),
        ("[fe80::1%eth0]:5000", ("fe80::1%eth0", 5000)),
        ("[::ffff:198.18.0.1]:7", ("::ffff:198.18.0.1", 7)),
    ],
)
def test_reads_host_and_port(text: str, want: tuple[str, int]) -> None:
    assert parse_hostport(text, what="x") == want


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "an empty string"),
        ("nohost", "no ':PORT'"),
        ("host:", "the port is missing"),
        (":80", "the host is empty"),
        ("host:0", "port 0 is out of range"),
        ("host:65536", "port 65536 is out of range"),
        ("host:http", "port 'http' is not a number"),
        ("host:+80", "is not a number"),
        ("host: 80", "is not a number"),
        ("host:\u0662", "is not a number"),  # an Arabic-Indic digit: isdigit() says yes, int() would read it
        ("host:123456", "is not a number"),
        ("::1:8080", "an IPv6 host goes in brackets"),
        ("[::1:8080", "'[' is never closed"),
        ("::1]:8080", "brackets go around the host only"),
        ("[::1]8080", "after ']'; expected ':PORT'"),
        ("[::1]", "no ':PORT' after ']'"),
        ("[[::1]]:80", "brackets are unbalanced"),
        ("[127.0.0.1]:80", "brackets hold an IPv6 address only"),
        ("[::g]:80", "is not an IPv6 address"),
        ("ho st:80", "may hold only letters"),
        ("h/x:80", "may hold only letters"),
        ("a" * (MAX_HOST + 1) + ":80", f"at most {MAX_HOST}"),
        ("a" * 300 + ":80", "characters (at most"),
    ],
)
def test_bad_text_says_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_hostport(text, what="node.http")
    assert e.value.code == ERR_CONFIG
    assert e.value.message.startswith("node.http ")
    assert "must look like HOST:PORT or [IPV6]:PORT with a port from 1 to 65535" in e.value.message
    assert reason in e.value.message


def test_not_a_string() -> None:
    with pytest.raises(ConfigError, match="got int 80"):
        parse_hostport(80, what="x")


def test_listen_address_may_say_port_0_and_a_dial_address_may_not() -> None:
    assert parse_hostport("0.0.0.0:0", what="x", listen=True) == ("0.0.0.0", 0)
    with pytest.raises(ConfigError, match="from 1 to 65535: port 0 is out of range"):
        parse_hostport("0.0.0.0:0", what="x")


def test_whose_input_it_is_sets_the_code() -> None:
    with pytest.raises(SwarmdError) as e:
        parse_hostport("x", what="rack addresses[0]", error=lambda m: SwarmdError(ERR_BAD_REQUEST, m))
    assert e.value.code == ERR_BAD_REQUEST and not isinstance(e.value, ConfigError)


def test_bare_ipv6_only_where_the_port_is_never_left_out() -> None:
    assert parse_hostport("::1:5000", what="observed", bare_ipv6=True) == ("::1", 5000)
    assert parse_hostport("[::1]:5000", what="observed", bare_ipv6=True) == ("::1", 5000)
    with pytest.raises(ConfigError, match="brackets"):
        parse_hostport("::1:5000", what="observed")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "got None"),
        ("h:1", "got 'h:1'"),
        (["h"], "got ['h']"),
        (["h", 1, 2], "got ['h', 1, 2]"),
        ([1, 1], "the host is int"),
        (["h", "80"], "the port is str"),
        (["h", True], "the port is bool"),
        (["h", 1.0], "the port is float"),
        (["", 80], "the host is empty"),
        (["h", 0], "port 0 is out of range"),
        (["h", 65536], "port 65536 is out of range"),
        (["h", -1], "port -1 is out of range"),
        (["[::1]", 80], "a bare host has no brackets"),
        (["::g", 80], "is not an IPv6 address"),
        (["a" * (MAX_HOST + 1), 80], f"at most {MAX_HOST}"),
    ],
)
def test_bad_pair_from_a_peer_is_a_bad_request(value: object, reason: str) -> None:
    with pytest.raises(SwarmdError) as e:
        parse_address(value, "signal 'addr'")
    assert e.value.code == ERR_BAD_REQUEST
    assert e.value.message.startswith("signal 'addr' must be [host, port] with a port from 1 to 65535")
    assert reason in e.value.message


def test_pairs_read_as_lists_or_tuples() -> None:
    assert parse_address(["::1", 80], "a") == ("::1", 80)
    assert parse_address(("h", 65535), "a") == ("h", 65535)


_hosts = st.one_of(
    st.from_regex(r"[A-Za-z0-9._-]{1,60}", fullmatch=True),
    st.ip_addresses().map(str),
)


@given(_hosts, st.integers(1, 65535))
def test_format_then_parse_gives_the_address_back(host: str, port: int) -> None:
    assert parse_hostport(format_hostport(host, port), what="x") == (host, port)
    assert parse_address([host, port], "x") == (host, port)


@given(st.text(max_size=300))
def test_any_text_is_read_or_refused_with_the_error_asked_for(text: str) -> None:
    for bare in (False, True):
        try:
            host, port = parse_hostport(text, what="x", bare_ipv6=bare)
        except ConfigError:
            continue
        assert 1 <= port <= 65535 and 0 < len(host) <= MAX_HOST


@given(st.lists(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20), st.binary(max_size=4)), max_size=3))
def test_any_pair_is_read_or_refused_as_a_bad_request(value: list[object]) -> None:
    try:
        host, port = parse_address(value, "x")
    except SwarmdError as e:
        assert e.code == ERR_BAD_REQUEST
        return
    assert isinstance(host, str) and 1 <= port <= 65535
