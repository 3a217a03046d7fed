"""The command line explains itself: every option has a one-line help with its default, each
command's --help ends with example commands, and every command the README shows is one the
parser accepts."""
import os
import re
import shlex

import pytest

from sarkernels.app.cli_args import parser

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def commands():
    return parser()._subparsers._group_actions[0].choices


def argv_of(line):
    """The arguments after ``sarkernels`` of a shell line, or None for another program."""
    words = shlex.split(line, comments=True)
    return words[words.index("sarkernels") + 1:] if "sarkernels" in words[:5] else None


@pytest.mark.parametrize("name", ["info", "train", "sample", "sample-many", "evaluate",
                                  "tokenize", "demo", "digit"])
def test_every_option_has_help_with_its_default_and_the_command_has_examples(name):
    command = commands()[name]
    formatter = command.formatter_class(command.prog)
    for action in command._actions:
        if action.dest == "help":
            continue
        text = formatter._get_help_string(action)
        assert text and "\n" not in text, (name, action.dest)
        flag = action.nargs == 0  # a switch: off unless given
        assert flag or action.required or "(default" in text, (name, action.dest, text)
    examples = [argv_of(line) for line in command.epilog.splitlines()[1:]]
    assert examples and all(examples), command.epilog
    for argv in examples:
        parser().parse_args(argv)  # raises on an option the parser does not know


def test_readme_commands_parse_and_point_to_help():
    text = open(README).read()
    shell = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S)).replace("\\\n", " ")
    lines = [argv_of(line) for line in shell.splitlines() if line.strip()]
    argvs = [argv for argv in lines if argv]
    assert len(argvs) >= 8
    for argv in argvs:
        parser().parse_args(argv)
    assert "python -m sarkernels COMMAND --help" in text
