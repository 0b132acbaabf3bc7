from pathlib import Path

import pytest

from swarmd.errors import ConfigError
from swarmd.node.config import load_settings
from swarmd.settings import Settings

TOML = """
[node]
port = 1111
dht_port = 2222
host = "0.0.0.0"
log_level = "DEBUG"

[env.production.node]
port = 3333
log_level = "WARNING"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "swarmd.toml"
    p.write_text(text)
    return p


def test_defaults():
    s = load_settings(Settings)
    assert s.node.port == 0 and s.node.roles == [] and s.node.bootstrap == []


def test_four_layers_in_order(tmp_path):
    cfg = write(tmp_path, TOML)
    s = load_settings(Settings, config_file=cfg)
    assert (s.node.port, s.node.dht_port, s.node.host) == (1111, 2222, "0.0.0.0")
    s = load_settings(Settings, config_file=cfg, env_name="production")
    assert s.node.port == 3333 and s.node.log_level == "WARNING" and s.node.dht_port == 2222
    s = load_settings(
        Settings,
        config_file=cfg,
        env_name="production",
        environ={"SWARMD_NODE_PORT": "4444", "SWARMD_DHT_PORT": "5555"},
    )
    assert s.node.port == 4444 and s.node.dht_port == 5555
    s = load_settings(
        Settings,
        config_file=cfg,
        env_name="production",
        environ={"SWARMD_NODE_PORT": "4444"},
        flags={"node": {"port": 6666}},
    )
    assert s.node.port == 6666 and s.node.log_level == "WARNING"
    assert s._origin["node.port"].startswith("command-line")
    # an overlay for an environment not chosen changes nothing
    s = load_settings(Settings, config_file=cfg, env_name="staging")
    assert s.node.port == 1111


def test_env_lists_and_bools(tmp_path):
    s = load_settings(
        Settings, environ={"SWARMD_BOOTSTRAP": "127.0.0.1:1, 127.0.0.1:2", "SWARMD_ROLES": "worker,store"}
    )
    assert s.node.bootstrap == ["127.0.0.1:1", "127.0.0.1:2"]
    assert s.node.roles == ["worker", "store"]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (
            {"environ": {"SWARMD_NODE_PORT": "eighty"}},
            "node.port from environment variable SWARMD_NODE_PORT must be an integer",
        ),
        ({"environ": {"SWARMD_NOPE": "1"}}, "unknown environment variable SWARMD_NOPE"),
        ({"flags": {"node": {"roles": ["chef"]}}}, "unknown role 'chef'"),
        ({"flags": {"node": {"port": 70000}}}, "node.port must be between 0 and 65535"),
        ({"flags": {"node": {"bootstrap": ["nohost"]}}}, "HOST:PORT"),
        ({"env_name": "qa"}, "unknown environment 'qa'"),
    ],
)
def test_errors_name_key_and_source(kwargs, needle):
    with pytest.raises(ConfigError) as ei:
        load_settings(Settings, **kwargs)
    assert needle in ei.value.message


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[node]\nprot = 1\n", "unknown key 'node.prot' in config file"),
        ("[nodes]\nport = 1\n", "unknown section [nodes]"),
        ('[node]\nport = "1"\n', "node.port from config file"),
        ("[node]\nport = true\n", "must be an integer"),
        ("[node\n", "not valid TOML"),
        ("[env.qa.node]\nport = 1\n", "unknown environment [env.qa]"),
        ("[env.production.node]\nportt = 1\n", "[env.production]"),
    ],
)
def test_file_errors(tmp_path, text, needle):
    with pytest.raises(ConfigError) as ei:
        load_settings(Settings, config_file=write(tmp_path, text), env_name="production")
    assert needle in ei.value.message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_settings(Settings, config_file=tmp_path / "nope.toml")
    assert "cannot read config file" in ei.value.message


def test_address_settings_read_by_the_one_address_reader():
    """tuple[str, int] settings from text (env, flags) go through node.address.parse_hostport:
    an IPv6 host loses its brackets, a bad port names the variable."""
    from swarmd.dht.part import dht_config_from

    s = load_settings(
        Settings,
        environ={"SWARMD_SWARM_ANNOUNCE_ADDRESSES": "[::1]:7000,198.18.0.1:7001", "SWARMD_NODE_BOOTSTRAP": "[::1]:49737"},
    )
    assert s.swarm.announce_addresses == [("::1", 7000), ("198.18.0.1", 7001)]
    assert dht_config_from(s).bootstrap == [("::1", 49737)]
    with pytest.raises(ConfigError, match="SWARMD_SWARM_ANNOUNCE_ADDRESSES.*port 'x' is not a number"):
        load_settings(Settings, environ={"SWARMD_SWARM_ANNOUNCE_ADDRESSES": "h:x"})
