"""Command-line options generated from the config models: one option per field.

Every field of a config model becomes an option named after it (`head_epochs` ->
`--head-epochs`, plus any `cli_aliases` the field declares), with its description and default
as help; a nested model (`thresholds`) contributes its fields as options of their own
(`--min-per-class`). Options left out keep the model's defaults, so `--help` and the Prefect
form can never disagree. pydantic-settings has a CLI too, but it wants repeated flags or JSON
for lists (`--backbones a --backbones b`) and dotted names for nested models, which would break
the documented `--backbones resnet50 vgg16` and `--min-per-class 10`.

A value pydantic refuses becomes one sentence that names the option as it was typed.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError


def option_names(name: str, field: Any) -> list[str]:
    """`--field-name` and the field's declared aliases."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return [f"--{name.replace('_', '-')}", *extra.get("cli_aliases", [])]


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _without_none(annotation: Any) -> Any:
    """`int | None` -> int (none is typed as the word "none" where it is meaningful)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def _default_text(field: Any) -> str:
    if field.is_required():
        return ""  # a positional argument: no default to show
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if isinstance(value, bool):
        return ""
    if isinstance(value, list | tuple):
        value = " ".join(str(item) for item in value)
    return f" (default: {'none' if value is None else value})"


def _argument(name: str, field: Any) -> tuple[list[str], dict[str, Any]]:
    """argparse names and keyword arguments for one pydantic field."""
    annotation = _without_none(field.annotation)
    origin = typing.get_origin(annotation)
    kwargs: dict[str, Any] = {"dest": name, "default": None,
                              "help": (field.description or "").rstrip(".") + _default_text(field)}
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        kwargs["choices"] = list(typing.get_args(annotation))
    elif origin is list:
        kwargs.update(nargs="+", metavar="VALUE")
    elif origin is tuple:
        items = typing.get_args(annotation)
        kwargs.update(nargs=len(items), type=items[0], metavar="X")
    elif annotation in (int, float):
        kwargs["type"] = annotation
        kwargs["metavar"] = "N" if annotation is int else "X"
    elif not field.is_required() and field.default is None:
        kwargs["metavar"] = "VALUE"
    if field.is_required():
        return [name], {key: value for key, value in kwargs.items() if key not in ("dest", "default")}
    return option_names(name, field), kwargs


def _groups(model: type[BaseModel]) -> list[tuple[str, list[str]]]:
    """(title, field names) per config model `model` is made of, in the order they were declared."""
    groups: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for base in reversed(model.__mro__):
        if not (isinstance(base, type) and issubclass(base, BaseModel)) or base is BaseModel:
            continue
        names = [name for name in base.__annotations__ if name in model.model_fields and name not in seen]
        if names:
            title = (base.__doc__ or base.__name__).strip().splitlines()[0].rstrip(".")
            groups.append((title, names))
            seen.update(names)
    return groups


def add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One option per field of `model`, grouped by the config model that declares it; nested
    models (`thresholds`) are flattened into a group of their own."""
    for title, names in _groups(model):
        group = parser.add_argument_group(title)
        for name in names:
            field = model.model_fields[name]
            nested = _nested_model(field.annotation)
            if nested is None:
                names_, kwargs = _argument(name, field)
                group.add_argument(*names_, **kwargs)
                continue
            inner_group = parser.add_argument_group(f"{name}: {(field.description or '').rstrip('.')}")
            for inner_name, inner in nested.model_fields.items():
                names_, kwargs = _argument(inner_name, inner)
                inner_group.add_argument(*names_, **kwargs)


def model_from_args(model: type[BaseModel], args: argparse.Namespace) -> BaseModel:
    """The model from the options that were given; the others keep the model's defaults."""
    given = vars(args)
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        if nested is not None:
            inner = {key: given[key] for key in nested.model_fields if given.get(key) is not None}
            if inner:
                values[name] = inner
        elif given.get(name) is not None:
            values[name] = given[name]
    return model.model_validate(values)


def field_option(model: type[BaseModel], location: Sequence[Any], typed: Sequence[str] = ()) -> str:
    """The option a pydantic error location belongs to (`("thresholds", "min_per_class")` -> --min-per-class).

    Of a field's spellings (`--head-epochs`, `--epochs`) the one in `typed` (the command line) wins,
    so the sentence names what the person wrote.
    """
    written = {argument.split("=", 1)[0] for argument in typed}
    names = [str(part) for part in location if isinstance(part, str)]
    for name in reversed(names):
        for field_name, field in model.model_fields.items():
            nested = _nested_model(field.annotation)
            if field_name == name:
                spellings = option_names(name, field)
            elif nested is not None and name in nested.model_fields:
                spellings = option_names(name, nested.model_fields[name])
            else:
                continue
            return next((spelling for spelling in spellings if spelling in written), spellings[0])
    return "the options"


def one_sentence(model: type[BaseModel], error: ValidationError, typed: Sequence[str] = ()) -> str:
    """The first pydantic error as one sentence naming the option to fix, as it was typed."""
    first = error.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"invalid {field_option(model, first['loc'], typed)}: {message}."


def program_name(module: str, script: str | None = None) -> str:
    """What the usage line calls the command: the installed script when that is how it was started, else `python -m`."""
    invoked = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return script if script is not None and invoked == script else f"python -m {module}"


def build_parser(model: type[BaseModel], prog: str, description: str,
                 extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    """A parser with one option per field of `model`, plus `--verbose` and the entry point's own options."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--verbose", action="store_true",
                        help="show everything libraries print (start-up lines, engine logs, tracebacks); "
                             "by default they go to the run's log file")
    if extra is not None:
        extra(parser)
    add_model_options(parser, model)
    return parser


def parse(model: type[BaseModel], parser: argparse.ArgumentParser,
          argv: Sequence[str] | None) -> tuple[argparse.Namespace, Any] | None:
    """(options, config) from the command line, or None after printing the one sentence that names the option."""
    from pydantic import ValidationError

    args = parser.parse_args(argv)
    try:
        return args, model_from_args(model, args)
    except ValidationError as error:
        typed = sys.argv[1:] if argv is None else list(argv)
        print(f"error: {one_sentence(model, error, typed)}", file=sys.stderr)
        return None
