"""What every command shares: the comma-separated list parser, and the command class that renders flags as
flags in `--help`. Imports nothing heavy (the CLI builds its help without torch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

from pmserve.errors import PMError

T = TypeVar("T")

_KINDS = {int: "integers", float: "numbers", str: "names"}


def parse_list(text: str, option: str, type: Callable[[str], T] = str) -> list[T]:
    """`a, b,c` -> [type(a), type(b), type(c)]; blanks and empty items are dropped, so "" gives [].

    A value `type` rejects (ValueError) is a PMError naming --OPTION and the text."""
    items = [x.strip() for x in text.split(",")]
    try:
        return [type(x) for x in items if x]
    except ValueError:
        what = _KINDS.get(type, "values")  # type: ignore[arg-type]
        raise PMError(f"--{option}: expected comma-separated {what}, got {text!r}") from None


def parse_pairs(text: str, option: str) -> dict[str, str]:
    """`a=x, b=y` -> {"a": "x", "b": "y"}; an item without "=" is a PMError naming --OPTION."""
    out = {}
    for item in parse_list(text, option):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise PMError(f"--{option}: expected NAME=VALUE items, got {item!r}")
        out[name.strip()] = value.strip()
    return out


def joined(values) -> str:
    """A list default as the comma-separated text its option takes: ("a", "b") -> "a,b"."""
    return ",".join(map(str, values))


def _hide_flag_types(params: list) -> list:
    """A flag takes no value, so its help row shows no type.

    typer >= 0.20 prints every parameter's type (`<int>`, `<str>`) in the Rich help panel through
    `display_type_rich`, and does so for flags too (`--resume <bool>`); its plain-text help already skips
    flags. Earlier typers printed click's metavar and skipped "BOOLEAN". Returning None for flags restores that
    for every option of every command, --help included, whatever the typer version."""
    for p in params:
        if getattr(p, "is_flag", False) and hasattr(p, "display_type_rich"):
            p.display_type_rich = _no_type
    return params


def _no_type(*_args, **_kwargs) -> None:
    return None


class Command(TyperCommand):
    """typer's command, with flags shown as flags in --help (see _hide_flag_types)."""

    def get_params(self, ctx):
        return _hide_flag_types(super().get_params(ctx))


class Group(TyperGroup):
    """typer's group, with flags shown as flags in --help (see _hide_flag_types)."""

    def get_params(self, ctx):
        return _hide_flag_types(super().get_params(ctx))


class App(typer.Typer):
    """typer.Typer whose commands default to `Command`: one place for every command's help rendering."""

    def __init__(self, **kwargs):
        kwargs.setdefault("cls", Group)
        super().__init__(**kwargs)

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)
