"""CLI subcommands, one module each (`swarmd topic ...` is commands/topic.py).

A command module defines:
    NAME: str                       the word after `swarmd`
    HELP: str                       one line for `swarmd --help`
    def add_arguments(parser) -> None
    def run(args) -> int            may also be `async def run(args) -> int`
and is found automatically, so adding a command touches no other file.
"""
