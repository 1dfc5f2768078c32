"""What an argparse parser accepts, as plain data for the generators.

The man pages and the bash completion are generated from the parsers of
`nwfilter` and `nwfilterd` (`describe`), so a command or an option added
to a parser appears in both once they are generated again.  Commands whose
name starts with an underscore are internal and left out.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """An option: its spellings and, when it takes a value, the value's name."""

    flags: tuple[str, ...]
    metavar: str | None  # None: a flag that takes no value
    help: str
    dest: str
    choices: tuple[str, ...] = ()
    group: int | None = None  # index of its mutually exclusive group, if any

    @property
    def takes_value(self) -> bool:
        return self.metavar is not None


@dataclass(frozen=True)
class Positional:
    metavar: str
    help: str
    repeated: bool  # nargs '+' or '*'
    optional: bool  # nargs '?' or '*'


@dataclass(frozen=True)
class Command:
    """A parser (the top level or one subcommand) as data."""

    name: str
    help: str
    description: str
    options: tuple[Option, ...]
    positionals: tuple[Positional, ...]

    def usage_items(self) -> list[tuple[Option, ...] | Positional]:
        """Its usage in order: each option alone, or with the others of its
        mutually exclusive group, then the positionals."""
        items: list[tuple[Option, ...] | Positional] = []
        seen: set[int] = set()
        for option in self.options:
            if option.group is None:
                items.append((option,))
            elif option.group not in seen:
                seen.add(option.group)
                items.append(tuple(o for o in self.options if o.group == option.group))
        items.extend(self.positionals)
        return items


@dataclass(frozen=True)
class ParserInfo:
    prog: str
    top: Command
    commands: tuple[Command, ...]

    def command(self, name: str) -> Command:
        for command in self.commands:
            if command.name == name:
                return command
        raise KeyError(name)


def _help_text(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if text == argparse.SUPPRESS:
        return ""
    if "%" in text:
        params = {**vars(action), "prog": prog}
        params = {k: getattr(v, "__name__", v) for k, v in params.items()}
        text = text % params
    return " ".join(text.split())


def _metavar(action: argparse.Action) -> str:
    if isinstance(action.metavar, str):
        return action.metavar
    if action.option_strings:
        return action.dest.upper()
    return action.dest


def _command(name: str, helptext: str, parser: argparse.ArgumentParser) -> Command:
    groups: dict[int, int] = {}
    for index, group in enumerate(parser._mutually_exclusive_groups):
        for action in group._group_actions:
            groups[id(action)] = index
    options: list[Option] = []
    positionals: list[Positional] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            takes = action.nargs != 0
            options.append(Option(
                flags=tuple(action.option_strings),
                metavar=_metavar(action) if takes else None,
                help=_help_text(action, parser.prog),
                dest=action.dest,
                choices=tuple(str(c) for c in action.choices or ()),
                group=groups.get(id(action)),
            ))
        else:
            positionals.append(Positional(
                metavar=_metavar(action),
                help=_help_text(action, parser.prog),
                repeated=action.nargs in ("+", "*"),
                optional=action.nargs in ("?", "*"),
            ))
    return Command(
        name=name,
        help=helptext,
        description=" ".join((parser.description or "").split()),
        options=tuple(options),
        positionals=tuple(positionals),
    )


def describe(parser: argparse.ArgumentParser) -> ParserInfo:
    """The top-level options of `parser` and each of its public subcommands."""
    commands: list[Command] = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help or "" for a in action._choices_actions}
        for name, sub in action.choices.items():
            if name.startswith("_"):
                continue
            commands.append(_command(name, " ".join(helps.get(name, "").split()), sub))
    top = _command(parser.prog, "", parser)
    return ParserInfo(prog=parser.prog, top=top, commands=tuple(commands))
