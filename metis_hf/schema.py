"""Config files (recipes, merge configs) validated with pydantic.

Their classes are pydantic dataclasses made with ``config_dataclass`` (unknown keys are errors);
``parse`` builds one from YAML data and ``check_fields`` checks a section of keyword arguments for
another dataclass (MetisConfig, LoraConfig) field by field. Either turns pydantic's report into one
line that names the key path and the bad value: ``tasks[2].train_size: Input should be greater
than or equal to 1 (got 0)``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, StrictInt, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic.errors import PydanticSchemaGenerationError


class RecipeError(ValueError):
    """A recipe or merge config that does not validate; the message starts with the key's path."""


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


# YAML gives ints for counts; a boolean or a string is a mistake, not a number.
Integer = StrictInt
Count = Annotated[StrictInt, Field(ge=1)]
Number = Annotated[float, BeforeValidator(_not_a_boolean)]  # "1e-4" (a string to PyYAML) is read too

_CONFIG = ConfigDict(extra="forbid")


def config_dataclass(cls: type) -> type:
    """A pydantic dataclass that refuses unknown keys (class decorator)."""
    return pydantic_dataclass(cls, config=_CONFIG)


def parse(cls: type, data: Any, section: str = "") -> Any:
    """``cls`` built from YAML data; any problem raises :class:`RecipeError` naming its key path."""
    if not isinstance(data, dict):
        raise RecipeError(f"{section or 'the file'}: expected a mapping, got {type(data).__name__}")
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as err:
        raise RecipeError(_error_line(err, cls, section)) from None


def check_fields(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    """Keyword arguments for dataclass ``cls`` (a recipe's ``training:`` or ``lora:`` section),
    each checked against its field's type; an unknown field or a wrong type names ``section.key``.
    One value for a list field is a list of one, as on the command line."""
    hints = typing.get_type_hints(cls)
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    checked = {}
    for key, value in values.items():
        if key not in allowed:
            raise RecipeError(f"{section}.{key}: unknown {cls.__name__} field")
        hint = hints[key]
        if typing.get_origin(hints[key]) is list and not isinstance(value, list):
            value = [value]
        if isinstance(value, str) and _accepts_float(hint) and _YAML11_NUMBER.fullmatch(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads 1e-4, without a dot, as a string
        try:
            adapter = TypeAdapter(hint, config=ConfigDict(strict=True))
        except PydanticSchemaGenerationError:
            checked[key] = value  # a type pydantic cannot describe: the class's own checks apply
            continue
        try:
            adapter.validate_python(value)
        except ValidationError as err:
            first = err.errors()[0]
            where = "".join(f"[{p}]" for p in first["loc"] if isinstance(p, int))
            raise RecipeError(f"{section}.{key}{where}: {_message(first)}") from None
        checked[key] = value
    return checked


_YAML11_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _accepts_float(hint: Any) -> bool:
    return hint is float or any(_accepts_float(arg) for arg in typing.get_args(hint))


def _message(error: dict[str, Any]) -> str:
    text = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if error["type"] in ("value_error", "assertion_error", "missing", "missing_argument"):
        return "required" if error["type"].startswith("missing") else text
    return f"{text} (got {error['input']!r})"


def _error_line(err: ValidationError, cls: type, section: str) -> str:
    first = err.errors()[0]
    loc = list(first["loc"])
    path = section
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f"{'.' if path else ''}{part}"
    if first["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        fields = _fields_at(cls, loc[:-1])
        allowed = f" (allowed: {', '.join(fields)})" if fields else ""
        return f"{path}: unknown key{allowed}"
    return f"{path or 'the file'}: {_message(first)}"


def _fields_at(cls: type, loc: list[Any]) -> list[str]:
    """The field names of the dataclass at ``loc`` inside ``cls`` (empty if there is none)."""
    current: Any = cls
    for part in [*loc, None]:
        while True:  # unwrap Annotated[...] and X | None
            args = [a for a in typing.get_args(current) if a is not type(None)]
            if typing.get_origin(current) is Annotated:
                current = args[0]
            elif typing.get_origin(current) in (typing.Union, types.UnionType):
                current = args[0] if len(args) == 1 else Any
            else:
                break
        if part is None:
            break
        if dataclasses.is_dataclass(current) and isinstance(part, str):
            current = typing.get_type_hints(current).get(part, Any)
        elif typing.get_origin(current) in (list, dict):
            current = typing.get_args(current)[-1]
        else:
            return []
    if not dataclasses.is_dataclass(current):
        return []
    return sorted(f.name for f in dataclasses.fields(current))
