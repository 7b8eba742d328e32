"""Command-line value conversion for ``mvpctl`` without pydantic, so that it starts fast.

Typer (0.2x) converts every non-flag option and argument through a pydantic ``TypeAdapter``
that it builds on first use; for ``mvpctl status`` that alone imports pydantic and builds
schemas, which costs more than everything else the command does. mvpctl's parameters are all
plain ``str``, ``bool``, ``int`` and ``float`` (optionally with ``min``/``max``), so
:class:`PlainParamsGroup` gives each such parameter a small converter that checks the same
things and words errors the same way. Anything else (paths, choices, lists, custom parsers, a
typer without the hook used here) keeps typer's own conversion: only the speed differs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import typer
from typer.core import TyperGroup

# The pydantic wording typer shows today, so errors read the same on either path.
_NOT_AN_INT = "Input should be a valid integer, unable to parse string as an integer"
_FRACTION = "Input should be a valid integer, got a number with a fractional part"
_NOT_A_NUMBER = "Input should be a valid number, unable to parse string as a number"
_NOT_A_BOOL_TEXT = "Input should be a valid boolean, unable to interpret input"
_NOT_A_BOOL = "Input should be a valid boolean"
# What pydantic reads as a boolean (after typer strips the text; empty text is False).
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"", "0", "off", "f", "false", "n", "no"})


class PlainConversion:
    """Converts one single-valued ``str``, ``bool``, ``int`` or ``float`` parameter and checks
    its ``min``/``max``; raises :class:`typer.BadParameter` (a usage error, exit 2)."""

    def __init__(
        self, kind: type[Any], minimum: float | None = None, maximum: float | None = None
    ) -> None:
        self.kind = kind
        self.minimum = minimum
        self.maximum = maximum

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        """The converted value (None stays None: an option that was not given)."""
        if value is None:
            return None
        try:
            converted = _CONVERTERS[self.kind](value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), ctx=ctx, param=param) from None
        # Written as "not >=" so that NaN fails the bound, as it does with pydantic.
        if self.minimum is not None and not converted >= self.minimum:
            raise typer.BadParameter(
                f"Input should be greater than or equal to {self.minimum}", ctx=ctx, param=param
            )
        if self.maximum is not None and not converted <= self.maximum:
            raise typer.BadParameter(
                f"Input should be less than or equal to {self.maximum}", ctx=ctx, param=param
            )
        return converted


def _to_str(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        if value in (0, 1):
            return bool(value)
        whole = isinstance(value, int) or value.is_integer()
        raise ValueError(_NOT_A_BOOL_TEXT if whole else _NOT_A_BOOL)
    if not isinstance(value, str):
        raise ValueError(_NOT_A_BOOL)
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(_NOT_A_BOOL_TEXT)


def _to_int(value: Any) -> int:
    if isinstance(value, int):  # bools too: pydantic takes True as 1
        return int(value)
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError(_FRACTION)
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(_NOT_AN_INT) from None


def _to_float(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    try:
        # float() takes "inf" and "nan" as pydantic does; the bounds decide about them.
        return float(str(value).strip())
    except ValueError:
        raise ValueError(_NOT_A_NUMBER) from None


_CONVERTERS: dict[type[Any], Callable[[Any], Any]] = {
    str: _to_str,
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
}


def plain_conversion_for(param: Any) -> PlainConversion | None:
    """A :class:`PlainConversion` for a typer parameter, or None to leave it to typer."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None or getattr(param, "_runtime_param", "absent") is not None:
        return None
    info = descriptor.parameter_info
    if (
        descriptor.annotation not in (str, int, float, bool)
        or descriptor.file_annotation is not None
        or getattr(info, "parser", None) is not None
        or getattr(info, "clamp", False)
        or getattr(param, "multiple", True)
        or getattr(param, "nargs", 0) != 1
    ):
        return None
    if descriptor.annotation in (str, bool):
        if info.min is not None or info.max is not None:
            return None
        return PlainConversion(descriptor.annotation)
    return PlainConversion(descriptor.annotation, info.min, info.max)


def install_plain_conversions(params: Iterable[Any]) -> None:
    """Give every plain parameter in ``params`` a :class:`PlainConversion` (once)."""
    for param in params:
        conversion = plain_conversion_for(param)
        if conversion is not None:
            # typer builds its converter lazily into this attribute; filling it first is
            # what keeps pydantic out.
            param._runtime_param = conversion


class PlainParamsGroup(TyperGroup):
    """The mvpctl command group: typer's, with :class:`PlainConversion` for the plain
    parameters (``--help`` included) of the group and of each command as it is looked up."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """Install the conversions on the group's own options, then parse as usual."""
        install_plain_conversions(self.get_params(ctx))
        return super().parse_args(ctx, args)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        """The command, with conversions installed on its parameters. (Its help option is
        made here with this context's help option names, which its own context inherits.)"""
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            install_plain_conversions(command.get_params(ctx))
        return command


__all__ = [
    "PlainConversion",
    "PlainParamsGroup",
    "install_plain_conversions",
    "plain_conversion_for",
]
