"""The bash completion of `nwfilter` and `nwfilterd`, generated from their parsers.

Commands and options come from the parsers (`nwfilter.docgen.parserinfo`);
what a value is comes from its option's name or choices and from the
argument's metavar (FILE: a file, DOMAIN: a domain name, ...).  Names of
filters, domains and ports are asked of the tool itself at completion time
(`nwfilter __complete KIND`, which only reads), with the `--root` and
`-c/--connect` given earlier on the command line.  The script needs bash
alone, not the bash-completion package.
"""

from __future__ import annotations

from collections.abc import Iterable

from nwfilter.backends import BACKEND_NAMES
from nwfilter.docgen.parserinfo import Command, Option, ParserInfo

#: positional metavar -> kind of value
_POSITIONAL_KINDS = {
    "FILE": "file",
    "NAME|UUID": "filters",
    "PORTDEV": "ports",
    "DOMAIN": "domains",
}

#: the lifecycle commands that make sense only for domains in some states
_DOMAIN_KINDS = {
    "start": "inactive-domains",
    "shutdown": "active-domains",
    "destroy": "active-domains",
    "suspend": "active-domains",
    "resume": "active-domains",
}


def option_kind(option: Option) -> str:
    """What an option's value is: a completion kind, '-' for a value with
    no completion, '' for a flag."""
    if not option.takes_value:
        return ""
    if option.choices:
        return "words " + " ".join(option.choices)
    if "backend" in option.dest:
        return "words " + " ".join(BACKEND_NAMES)
    if "netns" in option.dest:
        return "netns"
    if "root" in option.dest or option.metavar == "DIR":
        return "dir"
    if option.metavar in ("FILE", "SOCKET", "PATH"):
        return "file"
    return "-"


def argument_kind(command: Command) -> str:
    """The kind of a command's positional arguments and how many it takes
    ('KIND COUNT', COUNT '+' when repeated), or '' when it takes none."""
    if not command.positionals:
        return ""
    first = command.positionals[0]
    kind = _POSITIONAL_KINDS.get(first.metavar, "-")
    if kind == "domains":
        kind = _DOMAIN_KINDS.get(command.name, kind)
    count = "+" if any(p.repeated for p in command.positionals) else str(
        len(command.positionals)
    )
    return f"{kind} {count}"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _case(var: str, arms: Iterable[tuple[str, str]], indent: str = "    ") -> list[str]:
    lines = [f"{indent}case {var} in"]
    for pattern, value in arms:
        lines.append(f"{indent}    {pattern}) echo {_quote(value)} ;;")
    lines.append(f"{indent}esac")
    return lines


def _tables(prog: str, info: ParserInfo) -> list[str]:
    fn = prog.replace("-", "_")
    commands = [info.top, *info.commands]

    def key(command: Command) -> str:
        return "" if command is info.top else command.name

    lines = [f"_{fn}_commands={_quote(' '.join(c.name for c in info.commands))}", ""]
    lines.append(f"# _{fn}_options COMMAND: its options ('' for the global ones)")
    lines.append(f"_{fn}_options() {{")
    lines += _case('"$1"', (
        (_quote(key(c)), " ".join(f for o in c.options for f in o.flags)) for c in commands
    ))
    lines.append("}")
    lines.append("")
    lines.append(f"# _{fn}_value COMMAND OPTION: what the option's value is (nothing: a flag)")
    lines.append(f"_{fn}_value() {{")
    arms = [
        (_quote(f"{key(c)} {flag}"), option_kind(o))
        for c in commands for o in c.options if o.takes_value for flag in o.flags
    ]
    lines += _case('"$1 $2"', arms) if arms else ["    :"]
    lines.append("}")
    lines.append("")
    lines.append(f"# _{fn}_args COMMAND: KIND COUNT of its arguments")
    lines.append(f"_{fn}_args() {{")
    arms = [(_quote(key(c)), argument_kind(c)) for c in commands if argument_kind(c)]
    lines += _case('"$1"', arms) if arms else ["    :"]
    lines.append("}")
    return lines


_DRIVER = r"""
# _nwfilter_complete_values PROG KIND CUR: fill COMPREPLY with the values of KIND
_nwfilter_complete_values() {
    # Names hold no white space (`__complete` leaves such names out); file
    # names may, so their lines are split at newlines only.
    local prog=$1 kind=$2 cur=$3 IFS=$' \t\n'
    case $kind in
        dir)
            compopt -o filenames 2>/dev/null
            IFS=$'\n'
            COMPREPLY=($(compgen -d -- "$cur")) ;;
        file)
            compopt -o filenames 2>/dev/null
            IFS=$'\n'
            COMPREPLY=($(compgen -f -- "$cur")) ;;
        netns)
            COMPREPLY=($(compgen -W "$(command ls -1 /run/netns 2>/dev/null)" -- "$cur")) ;;
        words\ *)
            COMPREPLY=($(compgen -W "${kind#words }" -- "$cur")) ;;
        filters|ports|domains|*-domains)
            [[ $prog == nwfilter ]] || return 0
            COMPREPLY=($(compgen -W "$("${_nwfilter_tool:-nwfilter}" "${_nwfilter_query[@]}" \
                __complete "$kind" 2>/dev/null)" -- "$cur")) ;;
    esac
}

# _nwfilter_main PROG: complete COMP_WORDS[COMP_CWORD] of PROG's command line
_nwfilter_main() {
    local prog=$1 fn=${1//-/_}
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    local cmd='' w kind spec i=1 args=0
    local _nwfilter_tool=${COMP_WORDS[0]}
    local -a _nwfilter_query=()
    COMPREPLY=()
    while (( i < COMP_CWORD )); do
        w=${COMP_WORDS[i]}
        if [[ $w == --*=* ]]; then
            [[ -z $cmd && $w == --root=* || -z $cmd && $w == --connect=* ]] \
                && _nwfilter_query+=("$w")
            (( i++ )); continue
        fi
        kind=$(_${fn}_value "$cmd" "$w")
        if [[ -n $kind ]]; then
            # the option's value: the next word, or the one after a split '='
            if [[ ${COMP_WORDS[i+1]} == = ]]; then (( i++ )); fi
            if [[ -z $cmd ]] && (( i + 1 < COMP_CWORD )); then
                case $w in
                    --root|-c|--connect) _nwfilter_query+=("$w" "${COMP_WORDS[i+1]}") ;;
                esac
            fi
            (( i += 2 )); continue
        fi
        if [[ $w != -* ]]; then
            if [[ -z $cmd && -n ${_nwfilter_commands_of[$prog]} ]]; then
                cmd=$w
            else
                (( args++ ))
            fi
        fi
        (( i++ ))
    done
    if (( i > COMP_CWORD )); then
        # completing an option's value
        [[ $prev == = ]] && prev=${COMP_WORDS[COMP_CWORD-2]}
        [[ $cur == = ]] && cur=''
        kind=$(_${fn}_value "$cmd" "$prev")
        [[ $kind == - ]] || _nwfilter_complete_values "$prog" "$kind" "$cur"
        return 0
    fi
    if [[ $cur == -* ]]; then
        local IFS=$' \t\n'
        COMPREPLY=($(compgen -W "$(_${fn}_options "$cmd")" -- "$cur"))
        return 0
    fi
    if [[ -z $cmd && -n ${_nwfilter_commands_of[$prog]} ]]; then
        local IFS=$' \t\n'
        COMPREPLY=($(compgen -W "${_nwfilter_commands_of[$prog]}" -- "$cur"))
        return 0
    fi
    spec=$(_${fn}_args "$cmd")
    [[ -n $spec ]] || return 0
    if [[ ${spec##* } == + ]] || (( args < ${spec##* } )); then
        _nwfilter_complete_values "$prog" "${spec% *}" "$cur"
    fi
    return 0
}

_nwfilter() { _nwfilter_main nwfilter; }
_nwfilterd() { _nwfilter_main nwfilterd; }
"""


def generate(programs: Iterable[ParserInfo]) -> str:
    """The completion script for the programs described."""
    programs = list(programs)
    lines = [
        "# bash completion for " + " and ".join(p.prog for p in programs)
        + "   -*- shell-script -*-",
        "# Generated from their argument parsers by tools/gen_packaging.py; do not edit.",
        "",
    ]
    for info in programs:
        lines += _tables(info.prog, info)
        lines.append("")
    lines.append("declare -gA _nwfilter_commands_of=(")
    for info in programs:
        fn = info.prog.replace("-", "_")
        lines.append(f'    [{info.prog}]="${{_{fn}_commands}}"')
    lines.append(")")
    lines.append(_DRIVER.rstrip("\n"))
    for info in programs:
        lines.append(f"complete -F _{info.prog.replace('-', '_')} {info.prog}")
    return "\n".join(lines) + "\n"
