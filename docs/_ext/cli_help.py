"""Sphinx directive ``cli-help``: the ``lepton-flwr`` command's help, from its own parser.

``lepton_flwr.cli.main`` builds its argparse parser and parses; this extension calls it with
``parse_args`` intercepted, takes the parser it built, and renders ``--help`` of the command
and of every subcommand as literal blocks. A subcommand added to the CLI appears without an
edit here, and the page never disagrees with what the command prints.
"""

import argparse
import os

from docutils import nodes
from docutils.parsers.rst import Directive


class _ParserBuiltError(Exception):
    """Raised in place of parsing, carrying the parser that was about to parse."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def cli_parser() -> argparse.ArgumentParser:
    """The parser ``lepton_flwr.cli.main`` builds, before it parses anything."""
    from lepton_flwr import cli

    def capture(self, *args, **kwargs):
        raise _ParserBuiltError(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        cli.main([])
    except _ParserBuiltError as built:
        return built.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise RuntimeError("lepton_flwr.cli.main returned without parsing its arguments")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's name and parser, in the order the CLI declares them."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:  # argparse keeps subparsers nowhere public
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


class CliHelp(Directive):
    """Render ``lepton-flwr --help`` and ``lepton-flwr <command> --help`` for every command."""

    has_content = False

    def run(self):
        """The literal blocks and one section per subcommand."""
        os.environ["COLUMNS"] = "92"  # the width argparse wraps to: stable across terminals
        parser = cli_parser()
        out = [nodes.literal_block(text="$ lepton-flwr --help\n" + parser.format_help())]
        for name, sub in subcommands(parser).items():
            section = nodes.section(ids=[f"lepton-flwr-{name}"])
            section += nodes.title(text=f"lepton-flwr {name}")
            section += nodes.literal_block(
                text=f"$ lepton-flwr {name} --help\n" + sub.format_help()
            )
            out.append(section)
        return out


def setup(app):
    """Register the directive (Sphinx extension entry point)."""
    app.add_directive("cli-help", CliHelp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
