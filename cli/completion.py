"""Shell completion for bash, zsh and fish: ``sandboxctl completion SHELL`` prints the script.

Verbs, flags and the choices of flags are read from the command line's own parser when the
script is made, and written into it: completing them starts no Python. Sandbox names come from
the projection when they are asked for, through ``sandboxctl list -o name`` (as kubectl's
completion asks its API server), and only where a verb takes the name of an existing sandbox.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field

from sandboxctl.statemachine import Phase

SHELLS = ("bash", "zsh", "fish")
NAMES = "command sandboxctl list -o name 2>/dev/null"
# Positionals that name an existing sandbox; a new name (create's, clone's second) or a user's is not one.
_NAME_DESTS = ("name", "names", "source")
_NOT_SANDBOXES = ("create", "user", "host", "cp")
# The values of flags the parser leaves open (checked after parsing, with their own messages).
_VALUES = {"phase": [p.value for p in Phase]}


@dataclass
class Verb:
    """One verb (or ``lease acquire``-like sub-verb) as completion sees it."""

    path: str  # "" for the top level, "lease acquire" for a sub-verb
    help: str = ""
    verbs: dict[str, str] = field(default_factory=dict)  # its sub-verbs, with their help
    flags: list[str] = field(default_factory=list)
    valued: list[str] = field(default_factory=list)  # the flags that take a value
    choices: dict[str, list[str]] = field(default_factory=dict)  # flag: the values it takes
    names: bool = False  # its positionals name existing sandboxes


def verbs_of(parser: argparse.ArgumentParser) -> list[Verb]:
    """Every verb of ``parser``, the top level first."""
    out: list[Verb] = []

    def walk(p: argparse.ArgumentParser, path: str, help_text: str) -> None:
        verb = Verb(path, help_text)
        out.append(verb)
        subs: list[tuple[str, argparse.ArgumentParser, str]] = []
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help or "" for a in action._choices_actions}
                for name, sub in action.choices.items():
                    verb.verbs[name] = helps.get(name, "")
                    subs.append((name, sub, helps.get(name, "")))
            elif action.option_strings:
                if isinstance(action, argparse._HelpAction):
                    continue
                verb.flags += action.option_strings
                if action.nargs != 0:
                    verb.valued += action.option_strings
                    values = (
                        [str(c) for c in action.choices] if action.choices is not None else _VALUES.get(action.dest)
                    )
                    if values:
                        for flag in action.option_strings:
                            verb.choices[flag] = values
            elif action.dest in _NAME_DESTS and path and path.split()[0] not in _NOT_SANDBOXES:
                verb.names = True
        for name, sub, sub_help in subs:
            walk(sub, f"{path} {name}".strip(), sub_help)

    walk(parser, "", "")
    return out


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for ``shell`` (one of SHELLS)."""
    verbs = verbs_of(parser)
    if shell == "fish":
        return _fish(verbs)
    bash = _bash(verbs)
    if shell == "zsh":
        # zsh runs the bash function through its own bashcompinit, as many tools' scripts do.
        return "autoload -U +X compinit && compinit\nautoload -U +X bashcompinit && bashcompinit\n" + bash
    return bash


def _bash_map(name: str, entries: dict[str, str]) -> str:
    lines = [f"    [{shlex.quote(key)}]={shlex.quote(value)}" for key, value in entries.items()]
    return f"declare -gA {name}=(\n" + "\n".join(lines) + "\n)\n"


def _key(verb: Verb) -> str:
    """A verb's key in bash's tables, which take no empty key: its path after the program's name."""
    return f"sandboxctl {verb.path}".strip()


def _bash(verbs: list[Verb]) -> str:
    subverbs = {_key(v): " ".join(v.verbs) for v in verbs if v.verbs}
    flags = {_key(v): " ".join(v.flags) for v in verbs if v.flags}
    valued = {_key(v): " ".join(v.valued) for v in verbs if v.valued}
    choices = {f"{_key(v)}|{flag}": " ".join(values) for v in verbs for flag, values in v.choices.items()}
    names = "|" + "|".join(_key(v) for v in verbs if v.names) + "|"
    return (
        '# sandboxctl completion for bash: eval "$(sandboxctl completion bash)"\n'
        + _bash_map("_sandboxctl_verbs", subverbs)
        + _bash_map("_sandboxctl_flags", flags)
        + _bash_map("_sandboxctl_valued", valued)
        + _bash_map("_sandboxctl_choices", choices)
        + f"_sandboxctl_names={shlex.quote(names)}\n"
        + r"""
_sandboxctl() {
    # (not "path": zsh ties that name to $PATH)
    local cur=${COMP_WORDS[COMP_CWORD]} prev="" verb=sandboxctl word i
    (( COMP_CWORD > 0 )) && prev=${COMP_WORDS[COMP_CWORD-1]}
    # bash splits --flag=value at "=": complete the value of the flag before it
    if [[ $cur == "=" ]]; then
        cur=""
    elif [[ $prev == "=" ]] && (( COMP_CWORD > 1 )); then
        prev=${COMP_WORDS[COMP_CWORD-2]}
    fi
    COMPREPLY=()
    for (( i = 1; i < COMP_CWORD; i++ )); do
        word=${COMP_WORDS[i]}
        [[ $word == -- ]] && return 0  # the command run in the sandbox: the shell's own business
        if [[ $word == -* ]]; then
            [[ $word != *=* && " ${_sandboxctl_valued[$verb]} " == *" $word "* ]] && (( i++ ))
        elif [[ " ${_sandboxctl_verbs[$verb]} " == *" $word "* ]]; then
            verb="$verb $word"
        fi
    done
    if [[ -n ${_sandboxctl_choices[$verb|$prev]+set} ]]; then
        COMPREPLY=($(compgen -W "${_sandboxctl_choices[$verb|$prev]}" -- "$cur"))
    elif [[ $prev == -* && " ${_sandboxctl_valued[$verb]} " == *" $prev "* ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))  # a value of its own: a file, if anything
    elif [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "${_sandboxctl_flags[$verb]}" -- "$cur"))
    elif [[ -n ${_sandboxctl_verbs[$verb]} ]]; then
        COMPREPLY=($(compgen -W "${_sandboxctl_verbs[$verb]}" -- "$cur"))
    elif [[ $_sandboxctl_names == *"|$verb|"* ]]; then
        COMPREPLY=($(compgen -W "$("""
        + NAMES
        + r""")" -- "$cur"))
    elif [[ $verb == "sandboxctl cp" ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
    return 0
}
complete -F _sandboxctl sandboxctl
"""
    )


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish(verbs: list[Verb]) -> str:
    lines = [
        "# sandboxctl completion for fish: sandboxctl completion fish | source",
        "complete -c sandboxctl -e",
        "complete -c sandboxctl -f",
        # the verb path typed so far: the words that are verbs, each under the one before
        "function __sandboxctl_path",
        "    set -l path ''",
        "    set -l words (commandline -opc)",
        "    set -e words[1]",
        "    set -l skip 0",
        "    for word in $words",
        "        if test $skip = 1",
        "            set skip 0",
        "            continue",
        "        end",
        "        if test $word = '--'",
        "            printf '%s\\n' ' --'",  # after it, the command run in the sandbox: no verb is there
        "            return",
        "        end",
        "        if string match -q -- '-*' $word",
        "            if not string match -q -- '*=*' $word; and contains -- $word (__sandboxctl_valued $path)",
        "                set skip 1",
        "            end",
        "            continue",
        "        end",
        "        if contains -- $word (__sandboxctl_verbs $path)",
        '            set path (string trim -- "$path $word")',
        "        end",
        "    end",
        "    echo $path",
        "end",
    ]
    for name, table in (
        ("verbs", {v.path: list(v.verbs) for v in verbs if v.verbs}),
        ("valued", {v.path: v.valued for v in verbs if v.valued}),
    ):
        lines.append(f"function __sandboxctl_{name}")
        lines.append('    switch "$argv"')
        for path, words in table.items():
            lines.append(f"        case {_fish_quote(path)}")
            lines.append("            printf '%s\\n' " + " ".join(_fish_quote(w) for w in words))
        lines.append("    end")
        lines.append("end")
    for verb in verbs:
        at = f"test (__sandboxctl_path) = {_fish_quote(verb.path)}"
        for sub, sub_help in verb.verbs.items():
            lines.append(
                f"complete -c sandboxctl -n {_fish_quote(at)} -a {_fish_quote(sub)} -d {_fish_quote(sub_help)}"
            )
        for flag in verb.flags:
            option = f"-l {_fish_quote(flag[2:])}" if flag.startswith("--") else f"-s {_fish_quote(flag[1:])}"
            values = ""
            if flag in verb.choices:
                values = " -x -a " + _fish_quote(" ".join(verb.choices[flag]))
            elif flag in verb.valued:
                values = " -r -F"  # a value of its own: a file, if anything
            lines.append(f"complete -c sandboxctl -n {_fish_quote(at)} {option}{values}")
        if verb.names:
            lines.append(f"complete -c sandboxctl -n {_fish_quote(at)} -a '(command -q sandboxctl; and {NAMES})'")
        if verb.path == "cp":
            lines.append(f"complete -c sandboxctl -n {_fish_quote(at)} -F")
    return "\n".join(lines) + "\n"
