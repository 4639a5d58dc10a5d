"""What a newcomer meets first: --help on every option, one set of defaults for CLI, config and Python."""
import inspect

import typer.main

from dpsel.cli import app


def _commands():
    group = typer.main.get_command(app)
    return {name: command for name, command in group.commands.items()}


def test_every_option_of_every_command_has_help_text():
    missing = [f"{name} {param.opts[0]}" for name, command in _commands().items() for param in command.params
               if param.param_type_name == "option" and not (param.help or "").strip()]
    assert missing == []


def test_flow_help_lists_the_options_it_accepts():
    epilog = _commands()["flow"].epilog
    for option in ("--compare", "--train", "--out", "--budget", "--tune-steps", "--curate.select.batch-size"):
        assert option in epilog
