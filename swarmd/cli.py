"""`swarmd`: run the daemon (`swarmd --role worker`) or an operator command.

Common flags (every command understands them) map onto the [node] config
section and sit at the top of the config layers.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import os
import pkgutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from swarmd import __version__
from swarmd.errors import SwarmdError
from swarmd.node.config import ENV_NAMES, load_settings
from swarmd.settings import Settings

# flag -> (section, key, parse)
COMMON_FLAGS: dict[str, tuple[str, str]] = {
    "role": ("node", "roles"),
    "bootstrap": ("node", "bootstrap"),
    "dht_port": ("node", "dht_port"),
    "port": ("node", "port"),
    "host": ("node", "host"),
    "data_dir": ("node", "data_dir"),
    "http": ("node", "http"),
    "log_level": ("node", "log_level"),
    "log_format": ("node", "log_format"),
}


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def add_common_flags(p: argparse.ArgumentParser, *, daemon: bool) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--config", type=Path, default=None, help="TOML config file (env SWARMD_CONFIG)")
    g.add_argument(
        "--env", choices=ENV_NAMES, default=None, help="config overlay [env.NAME] (env SWARMD_ENV)"
    )
    g.add_argument(
        "--bootstrap",
        type=_csv,
        default=None,
        metavar="HOST:PORT[,HOST:PORT]",
        help="DHT bootstrap nodes (env SWARMD_BOOTSTRAP); none: start a new swarm",
    )
    g.add_argument("--data-dir", type=Path, default=None, help="where keys, models and databases live")
    g.add_argument(
        "--log-level",
        default=None,
        type=str.upper,
        choices=["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"],
    )
    g.add_argument("--log-format", default=None, choices=["auto", "json", "text"])
    if daemon:
        g.add_argument(
            "--role",
            type=_csv,
            default=None,
            metavar="ROLES",
            help="comma-separated: gateway,orchestrator,worker,store,relay,bootstrap",
        )
        g.add_argument("--host", default=None, help="RPC listen address (default 127.0.0.1)")
        g.add_argument("--port", type=int, default=None, help="RPC/TCP port (0: any free port)")
        g.add_argument("--dht-port", type=int, default=None, help="DHT UDP port (0: any free port)")
        g.add_argument("--http", default=None, metavar="HOST:PORT", help="gateway HTTP listen address")


def discover_commands() -> dict[str, ModuleType]:
    import swarmd.commands as pkg

    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"swarmd.commands.{info.name}")
        name = getattr(mod, "NAME", None)
        if isinstance(name, str) and hasattr(mod, "run"):
            found[name] = mod
    return found


def build_parser(commands: dict[str, ModuleType]) -> Parser:
    p = Parser(
        prog="swarmd",
        description="Peer-to-peer daemon that serves AI models. "
        "Run `swarmd --role ROLES` for the daemon, or a command below.",
    )
    p.add_argument("--version", action="version", version=f"swarmd {__version__}")
    add_common_flags(p, daemon=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, mod in sorted(commands.items()):
        sp = sub.add_parser(name, help=getattr(mod, "HELP", ""), description=getattr(mod, "HELP", ""))
        add_common_flags(sp, daemon=False)
        mod.add_arguments(sp)
    return p


def settings_from_args(args: argparse.Namespace, environ: dict[str, str]) -> Settings:
    flags: dict[str, dict[str, Any]] = {}
    for attr, (section, key) in COMMON_FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None:
            flags.setdefault(section, {})[key] = value
    config_file = args.config or (Path(environ["SWARMD_CONFIG"]) if environ.get("SWARMD_CONFIG") else None)
    env_name = args.env or environ.get("SWARMD_ENV") or None
    return load_settings(Settings, config_file=config_file, env_name=env_name, environ=environ, flags=flags)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ)
    try:
        commands = discover_commands()
        parser = build_parser(commands)
        args = parser.parse_args(argv)
        settings = settings_from_args(args, environ)
    except UsageError as e:
        print(f"swarmd: error: {e}", file=sys.stderr)
        return 2
    except SwarmdError as e:
        print(f"swarmd: error: {e.message}", file=sys.stderr)
        return 2
    if args.command is not None and "node.log_level" not in settings._origin:
        # operator commands print results; their logs stay quiet unless asked for
        settings.node.log_level = "WARNING"
    args.settings = settings

    from swarmd.node.logging import setup_logging

    setup_logging(settings.node.log_level, settings.node.log_format)
    try:
        if args.command is None:
            from swarmd.node.eventloop import exit_process, run

            exit_process(run(run_daemon(settings), settings.node.event_loop, reap_timeout=2.0))
        result = commands[args.command].run(args)
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except SwarmdError as e:
        print(f"swarmd: error: {e.code}: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `swarmd ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


async def run_daemon(settings: Settings) -> int:
    from swarmd.daemon import Node

    return await Node(settings).run()


if __name__ == "__main__":
    sys.exit(main())
