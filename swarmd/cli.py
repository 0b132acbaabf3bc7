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
from swarmd.errors import ERR_BAD_REQUEST, SwarmdError
from swarmd.node.config import ENV_NAMES, load_settings
from swarmd.settings import Settings

# flag -> (section, key)
COMMON_FLAGS: dict[str, tuple[str, str]] = {
    "role": ("node", "roles"),
    "bootstrap": ("node", "bootstrap"),
    "dht_port": ("node", "dht_port"),
    "port": ("node", "port"),
    "host": ("node", "host"),
    "data_dir": ("node", "data_dir"),
    "http": ("node", "http"),
    "grpc": ("gateway", "grpc"),
    "metrics": ("node", "metrics"),
    "otlp": ("tracing", "endpoint"),
    "log_level": ("node", "log_level"),
    "log_format": ("node", "log_format"),
}

# Flags every command and the daemon take, wherever they stand (`swarmd --data-dir D keys ls` ==
# `swarmd keys ls --data-dir D`). A command lists in its FLAGS which of OPTIONAL_FLAGS apply to
# it; giving one that does not is an error, never silently ignored.
OPTIONAL_FLAGS = ("bootstrap", "data_dir", "host", "json")
DAEMON_FLAGS = ("role", "port", "dht_port", "http", "grpc", "metrics", "otlp")  # only the daemon (no command) takes these


class UsageError(Exception):
    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog
        self.message = message


class Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line (exit status 2) and never takes an
    abbreviation of a flag for the flag (`--rol worker` is not `--role worker`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(self.prog, message)


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def add_common_flags(p: argparse.ArgumentParser, *, daemon: bool) -> None:
    """The common flags; on the top parser (daemon=True) with the daemon's own, on every
    command parser with defaults suppressed, so a flag given before the command is not
    overwritten by the command's parser."""
    from swarmd.roles.base import ROLE_ORDER

    dflt: Any = None if daemon else argparse.SUPPRESS
    g = p.add_argument_group("common options (before or after the command)")
    g.add_argument("--config", type=Path, default=dflt, help="TOML config file (env SWARMD_CONFIG)")
    g.add_argument(
        "--env", choices=ENV_NAMES, default=dflt, help="config overlay [env.NAME] (env SWARMD_ENV)"
    )
    g.add_argument(
        "--bootstrap",
        type=_csv,
        default=dflt,
        metavar="HOST:PORT[,HOST:PORT]",
        help="DHT bootstrap nodes (env SWARMD_BOOTSTRAP); none: start a new swarm",
    )
    g.add_argument("--data-dir", type=Path, default=dflt, help="where keys, models and databases live")
    g.add_argument(
        "--host",
        default=dflt,
        help="the node's address: where the daemon listens (default 127.0.0.1); for a command, "
        "where to reach the local node (default: the address in its status.json)",
    )
    g.add_argument(
        "--log-level",
        default=dflt,
        type=str.upper,
        choices=["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"],
    )
    g.add_argument("--log-format", default=dflt, choices=["auto", "json", "text"])
    g.add_argument("--json", action="store_true", default=dflt, help="print JSON (commands)")
    if daemon:
        d = p.add_argument_group("daemon options (`swarmd --role ROLES`, no command)")
        role = d.add_argument(
            "--role",
            type=_csv,
            default=None,
            metavar="ROLES",
            help=f"comma-separated: {','.join(ROLE_ORDER)}",
        )
        role.completions = list(ROLE_ORDER)  # type: ignore[attr-defined]  # swarmd completion offers these
        d.add_argument("--port", type=int, default=None, help="RPC/TCP port (0: any free port)")
        d.add_argument("--dht-port", type=int, default=None, help="DHT UDP port (0: any free port)")
        d.add_argument("--http", default=None, metavar="HOST:PORT", help="gateway HTTP listen address")
        d.add_argument("--grpc", default=None, metavar="HOST:PORT",
                       help="gateway OIP v2 gRPC listen address (off unless given)")
        d.add_argument("--metrics", default=None, metavar="HOST:PORT",
                       help="serve Prometheus metrics of every role on HOST:PORT/metrics (off unless given)")
        d.add_argument("--otlp", default=None, metavar="URL",
                       help="trace requests (OpenTelemetry, swarmd[otel]) to this OTLP endpoint; "
                            "sets tracing.enabled and tracing.endpoint")


def discover_commands() -> dict[str, ModuleType]:
    import swarmd.commands as pkg

    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"swarmd.commands.{info.name}")
        name = getattr(mod, "NAME", None)
        if isinstance(name, str) and hasattr(mod, "run"):
            found[name] = mod
    return found


def _sub_parsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    return [sp for a in p._actions if isinstance(a, argparse._SubParsersAction) for sp in a.choices.values()]


def _with_common_flags(p: argparse.ArgumentParser) -> None:
    """Common flags on p and every parser below it (`swarmd keys create --data-dir D`)."""
    add_common_flags(p, daemon=False)
    p.set_defaults(_prog=p.prog)  # the deepest parser's name heads error lines
    for sp in _sub_parsers(p):
        _with_common_flags(sp)


def build_parser(commands: dict[str, ModuleType]) -> Parser:
    p = Parser(
        prog="swarmd",
        description="Peer-to-peer daemon that serves AI models. "
        "Run `swarmd --role ROLES` for the daemon, or a command below. Common options go "
        "before or after the command, at any depth.",
    )
    p.add_argument("--version", action="version", version=f"swarmd {__version__}")
    add_common_flags(p, daemon=True)
    p.set_defaults(_prog="swarmd")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, mod in sorted(commands.items()):
        sp = sub.add_parser(name, help=getattr(mod, "HELP", ""), description=getattr(mod, "HELP", ""))
        mod.add_arguments(sp)
        _with_common_flags(sp)
    return p


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_flags(args: argparse.Namespace, commands: dict[str, ModuleType]) -> None:
    """Refuse a common flag that the command (or the daemon) would not use."""
    prog = getattr(args, "_prog", "swarmd")
    if args.command is None:
        if args.json:
            raise UsageError(prog, "--json applies to commands; the daemon logs JSON with --log-format json")
        return
    for dest in DAEMON_FLAGS:
        if getattr(args, dest, None) is not None:
            raise UsageError(prog, f"{_flag(dest)} applies to the daemon (`swarmd {_flag(dest)} ...` "
                                   f"with no command), not to `{prog}`")
    uses = set(getattr(commands[args.command], "FLAGS", ()))
    for dest in OPTIONAL_FLAGS:
        if getattr(args, dest, None) not in (None, False) and dest not in uses:
            raise UsageError(prog, f"{_flag(dest)} does not apply to `{prog}`")


def settings_from_args(args: argparse.Namespace, environ: dict[str, str]) -> Settings:
    flags: dict[str, dict[str, Any]] = {}
    for attr, (section, key) in COMMON_FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None:
            flags.setdefault(section, {})[key] = value
    if getattr(args, "otlp", None):
        flags["tracing"]["enabled"] = True  # --otlp URL turns tracing on, as [tracing] enabled = true would
    config_file = args.config or (Path(environ["SWARMD_CONFIG"]) if environ.get("SWARMD_CONFIG") else None)
    env_name = args.env or environ.get("SWARMD_ENV") or None
    return load_settings(Settings, config_file=config_file, env_name=env_name, environ=environ, flags=flags)


def _unknown_flag(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[str, str] | None:
    """The first --flag no parser knows, named with the nearest real one: `--rol worker` would
    otherwise read as "invalid choice: 'worker'" (flags are never abbreviated)."""
    import difflib

    known: set[str] = set()
    todo = [parser]
    while todo:
        p = todo.pop()
        known.update(o for a in p._actions for o in a.option_strings)
        todo.extend(_sub_parsers(p))
    for word in argv:
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and flag != "--" and flag not in known:
            near = difflib.get_close_matches(flag, sorted(known), n=1)
            return flag, "flags are never abbreviated" + (f"; did you mean {near[0]}?" if near else "")
    return None


def _error_line(prog: str, code: str, message: str) -> str:
    """The one error line every command prints: `swarmd <cmd>: ERR_CODE: message`."""
    return f"{prog}: {code}: {message}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ)
    prog = "swarmd"
    try:
        commands = discover_commands()
        parser = build_parser(commands)
        args = parser.parse_args(argv)
        prog = getattr(args, "_prog", prog)
        check_flags(args, commands)
        args.json = bool(args.json)
        settings = settings_from_args(args, environ)
    except UsageError as e:
        message = e.message
        unknown = _unknown_flag(parser, argv) if "parser" in locals() else None
        if unknown is not None:
            flag, hint = unknown
            message = f"{message} ({hint})" if flag in message else f"unknown flag {flag} ({hint})"
        print(_error_line(e.prog, ERR_BAD_REQUEST, message), file=sys.stderr)
        return 2
    except SwarmdError as e:
        print(_error_line(prog, e.code, e.message), file=sys.stderr)
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
        print(_error_line(prog, e.code, e.message), file=sys.stderr)
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
