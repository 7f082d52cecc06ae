"""Command lines generated from the config models, and the one way every entry point ends.

Every field of a config model becomes an option named after it (`head_epochs` ->
`--head-epochs`, plus any `cli_aliases` the field declares), with its description and default
as help; a nested model (`thresholds`) contributes its fields as options of their own
(`--min-per-class`). Options left out keep the model's defaults, so `--help` and the Prefect
form can never disagree. pydantic-settings has a CLI too, but it wants repeated flags or JSON
for lists (`--backbones a --backbones b`) and dotted names for nested models, which would break
the documented `--backbones resnet50 vgg16` and `--min-per-class 10`.

`run_main` gives every entry point the same ending: exit 0 with the result, or exit 2 with
one `error:` line that names the option or command to fix; details go to the log file.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Callable, Sequence
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


def field_option(model: type[BaseModel], location: Sequence[Any]) -> str:
    """The option a pydantic error location belongs to (`("thresholds", "min_per_class")` -> --min-per-class)."""
    names = [str(part) for part in location if isinstance(part, str)]
    for name in reversed(names):
        for field_name, field in model.model_fields.items():
            nested = _nested_model(field.annotation)
            if field_name == name:
                return option_names(name, field)[0]
            if nested is not None and name in nested.model_fields:
                return option_names(name, nested.model_fields[name])[0]
    return "the options"


def one_sentence(model: type[BaseModel], error: ValidationError) -> str:
    """The first pydantic error as one sentence naming the option to fix."""
    first = error.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"invalid {field_option(model, first['loc'])}: {message}."


def build_parser(model: type[BaseModel], prog: str, description: str,
                 extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    """A parser with one option per field of `model`, plus the entry point's own options."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_model_options(parser, model)
    if extra is not None:
        extra(parser)
    return parser


def run_main(work: Callable[[], int], *, on_error: Callable[[BaseException], None] | None = None) -> int:
    """Run an entry point's work: its exit code, or 2 with one `error:` line for bad input.

    Input errors (the project's `InputError`) and invalid options are what a person fixes, so
    they get their one sentence and no traceback; anything else is a bug or an outage and is
    raised as usual.
    """
    from tasks.common.errors import InputError

    try:
        return work()
    except InputError as error:
        if on_error is not None:
            on_error(error)
        print(f"error: {error}", file=sys.stderr)
        return 2
