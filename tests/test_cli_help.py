"""`--help` describes every option of every command and states its default."""

from __future__ import annotations

import argparse

from fervit.cli import build_parser


def all_parsers(parser: argparse.ArgumentParser, name: str = "fervit"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from all_parsers(sub, f"{name} {sub_name}")


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """The options without a help text, and those taking a value whose rendered help names no default."""
    formatter = parser._get_formatter()
    bad = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip():
            bad.append(f"{name}: no help")
        elif action.option_strings and action.nargs != 0 and \
                "default" not in formatter._expand_help(action).lower():
            bad.append(f"{name}: no default stated")
    return bad


def test_every_option_of_every_command_has_help_and_a_default():
    parsers = dict(all_parsers(build_parser()))
    assert {"fervit train", "fervit evaluate", "fervit serve", "fervit data fetch", "fervit data audit"} <= set(parsers)
    problems = [f"{name} {bad}" for name, p in parsers.items() for bad in undocumented(p)]
    assert not problems, "\n".join(problems)


def test_the_rendered_help_shows_defaults():
    help_text = " ".join(dict(all_parsers(build_parser()))["fervit serve"].format_help().split())
    assert "(default: 127.0.0.1)" in help_text and "(default: 8000)" in help_text


def test_undocumented_options_are_caught():
    p = argparse.ArgumentParser()
    p.add_argument("--bare")
    p.add_argument("--size", type=int, help="how big")
    p.add_argument("--flag", action="store_true", help="a switch")
    assert undocumented(p) == ["--bare: no help", "--size: no default stated"]
