"""mvpctl's pydantic-free parameter conversion agrees with typer's own, value for value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from mvpctl.app import app
from mvpctl.plain_params import PlainConversion, PlainParamsGroup, plain_conversion_for

PYTHON = sys.executable


def _typer_params() -> list[Any]:
    """Every parameter of every mvpctl command, as typer builds them (help options too)."""
    group = typer.main.get_command(app)
    assert isinstance(group, PlainParamsGroup)
    ctx = typer.Context(group)
    params = list(group.get_params(ctx))
    for command in group.commands.values():  # not get_command: that installs conversions
        params.extend(command.get_params(ctx))
    return params


def _outcome(conversion: Any, value: Any, param: Any) -> tuple[str, Any]:
    try:
        return ("ok", conversion.coerce(value, param=param, ctx=None))
    except typer.BadParameter as exc:
        return ("error", exc.message)


def _typer_conversion(param: Any) -> Any:
    # What typer itself would build for this parameter (its pydantic adapter).
    from typer._coercion import build_runtime_param

    return build_runtime_param(param.type_descriptor)


INPUTS = [
    None,
    "",
    " 7 ",
    "0",
    "1",
    "-3",
    "2.5",
    "1e3",
    "x",
    "inf",
    "-inf",
    "nan",
    "yes",
    "Off",
    "maybe",
    "0.001",
    "0.0009",
    True,
    False,
    5,
    0.25,
]


@pytest.mark.parametrize(
    "param", _typer_params(), ids=lambda p: f"{p.name}:{p.type_descriptor.annotation.__name__}"
)
def test_every_mvpctl_parameter_converts_like_typer(param: Any) -> None:
    conversion = plain_conversion_for(param)
    assert isinstance(conversion, PlainConversion), "mvpctl has only plain parameters"
    reference = _typer_conversion(param)
    for value in INPUTS:
        assert _outcome(conversion, value, param) == _outcome(reference, value, param), value


def test_other_parameters_are_left_to_typer() -> None:
    other = typer.Typer(cls=PlainParamsGroup, add_completion=False)

    @other.command()
    def command(
        where: Path = typer.Option(Path("/"), "--where"),
        names: list[str] = typer.Option([], "--name"),
        clamped: int = typer.Option(1, "--clamped", min=0, max=9, clamp=True),
        parsed: int = typer.Option(1, "--parsed", parser=int),
        plain: int = typer.Option(1, "--plain"),
    ) -> None:
        """A command with parameters of every sort."""

    @other.command()
    def another() -> None:
        """A second command, so that the first is a subcommand."""

    group = typer.main.get_command(other)
    ctx = typer.Context(group)
    assert isinstance(group, PlainParamsGroup)
    found = group.get_command(ctx, "command")
    assert found is not None
    params = {p.name: p for p in found.params}
    for name in ("where", "names", "clamped", "parsed"):
        assert plain_conversion_for(params[name]) is None, name
    # Installed when the command was looked up: nothing left to install.
    assert plain_conversion_for(params["plain"]) is None
    assert isinstance(params["plain"]._runtime_param, PlainConversion)


def test_running_a_command_loads_no_pydantic(tmp_path: Path) -> None:
    code = (
        "import sys, mvpctl.app\n"
        f"sys.argv = ['mvpctl', '--socket', {str(tmp_path / 'none.sock')!r}, '-j',\n"
        "            'recv', 'bob', '--limit', '3', '--follow']\n"
        "try:\n"
        "    mvpctl.app.main()\n"
        "except SystemExit as exc:\n"
        "    print(exc.code, sorted({m.split('.')[0] for m in sys.modules}\n"
        "                           & {'pydantic', 'pydantic_core', 'rich', 'asyncio'}))\n"
    )
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "3 []"


def _words(output: str) -> str:
    # The error may come in a box, wrapped: keep only the words.
    return " ".join(output.replace("\u2502", " ").split())


def test_bad_values_are_usage_errors_with_typers_wording() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["--socket", "/nonexistent", "recv", "bob", "--limit", "0"])
    assert result.exit_code == 2
    assert "Input should be greater than or equal to 1" in _words(result.output)
    result = runner.invoke(app, ["--socket", "/nonexistent", "connect", "bob", "-t", "soon"])
    assert result.exit_code == 2
    assert "Input should be a valid number" in _words(result.output)
