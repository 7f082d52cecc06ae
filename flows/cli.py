"""Command lines generated from the config models, and the one way every entry point ends.

Every field of a config model becomes an option named after it (`head_epochs` ->
`--head-epochs`, plus any `cli_aliases` the field declares), with its description and default
as help; a nested model (`thresholds`) contributes its fields as options of their own
(`--min-per-class`). Options left out keep the model's defaults, so `--help` and the Prefect
form can never disagree. pydantic-settings has a CLI too, but it wants repeated flags or JSON
for lists (`--backbones a --backbones b`) and dotted names for nested models, which would break
the documented `--backbones resnet50 vgg16` and `--min-per-class 10`.

`run_main` gives every entry point the same ending and the same quiet terminal: the steps,
their counts, progress and the result; on bad input one `error:` line that names the option or
command to fix and the log file that holds every detail (`--verbose` shows them instead). It
also runs the flows against a temporary Prefect server that dies with the command
(flows/prefect_server.py), unless a Prefect API is configured.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TextIO

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


LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s %(threadName)s: %(message)s"


class _OursOnly(logging.Filter):
    """Lines the pipeline wrote for people (tasks.common.logs.OURS), and anything of WARNING or worse of ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        from tasks.common.logs import OURS

        return bool(getattr(record, OURS, False))


class _Terminal(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%H:%M:%S")
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{stamp}  {level}{record.getMessage()}"


def quiet_environment() -> None:
    """Settings that keep libraries from talking: set before they start (TensorFlow, Prefect's server)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


@contextlib.contextmanager
def patient_prefect() -> Iterator[None]:
    """A first run creates Prefect's database; on a small machine that outlasts the default 20 s wait."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as TIMEOUT
    from prefect.settings import temporary_settings

    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ:
        yield
        return
    with temporary_settings({TIMEOUT: max(TIMEOUT.value(), 120)}):
        yield


@contextlib.contextmanager
def console(log_path: Path, *, verbose: bool = False) -> Iterator[TextIO]:
    """The terminal shows the pipeline's own lines; everything else goes to `log_path`.

    Libraries write a lot to stderr: TensorFlow's C++ start-up lines, CUDA probes, Prefect's
    engine chatter and one traceback per flow level for a handled error, MLflow's progress
    bars and warnings. Without `verbose`, file descriptor 2 and `sys.stderr` point at the log
    file for the duration (so C/C++ writers and child processes are caught too), and a handler
    on the terminal shows only records marked as ours (steps, counts, progress, warnings).
    Yields the terminal stream, for the final result or error line. With `verbose` nothing
    is redirected and everything is shown, as Prefect and the libraries print it.
    """
    quiet_environment()
    terminal = sys.stderr
    if verbose:
        yield terminal
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed below
    own_terminal = None
    if _fileno(terminal) == 2:  # the real stderr: keep a handle on the terminal before fd 2 is redirected
        own_terminal = terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    ours = logging.StreamHandler(terminal)
    ours.setLevel(logging.INFO)
    ours.addFilter(_OursOnly())
    ours.setFormatter(_Terminal())
    everything = logging.StreamHandler(log_file)
    everything.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    previous_level = root.level
    moved = [handler for logger in (root, logging.getLogger("prefect")) for handler in logger.handlers
             if isinstance(handler, logging.StreamHandler) and handler not in (ours, everything)]
    streams = {handler: handler.setStream(log_file) for handler in moved}
    for name in ("tasks", "flows"):
        logging.getLogger(name).setLevel(logging.INFO)
    root.addHandler(ours)
    root.addHandler(everything)
    sys.stderr.flush()
    saved_fd = os.dup(2)
    os.dup2(log_file.fileno(), 2)
    sys.stderr = log_file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            logging.captureWarnings(True)
            yield terminal
    finally:
        logging.captureWarnings(False)
        sys.stderr = terminal
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        for handler, stream in streams.items():
            handler.setStream(stream)
        root.removeHandler(ours)
        root.removeHandler(everything)
        root.setLevel(previous_level)
        log_file.close()
        if own_terminal is not None:
            own_terminal.close()


def _fileno(stream: Any) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def log_path_for(data_dir: str | os.PathLike[str], command: str) -> Path:
    """data_dir/logs/<command>-<UTC time>.log: beside the data it speaks of, never shared between runs."""
    from datetime import datetime, timezone

    from tasks.data.datafolder import DataFolder

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return DataFolder.at(data_dir).logs / f"{command}-{stamp}.log"


def check_prefect_api() -> None:
    """One sentence instead of a retry storm when PREFECT_API_URL points at a server that is not running."""
    url = os.environ.get("PREFECT_API_URL") or _profile_api_url()
    if not url:
        return
    import httpx

    from tasks.common.errors import ConfigError

    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=5.0).raise_for_status()
    except httpx.HTTPError:
        raise ConfigError(f"PREFECT_API_URL is {url}, which does not answer; start that server "
                          "(prefect server start), or run without it: unset PREFECT_API_URL, or "
                          "prefect config unset PREFECT_API_URL if it is set in your Prefect profile.") from None


def _profile_api_url() -> str | None:
    try:
        from prefect.settings import get_current_settings

        value = get_current_settings().api.url
    except Exception:  # noqa: BLE001 - no usable profile means no server to check
        return None
    return str(value) if value else None


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


def run_main(work: Callable[[], int], *, log_path: Path, verbose: bool = False) -> int:
    """Run an entry point's work with a quiet console: its exit code, or one `error:` line.

    Input errors (the project's `InputError`) are what a person fixes: one sentence, exit 2.
    Anything else is a bug or an outage: one line naming it and the log file holding the
    traceback, exit 1. With `verbose`, tracebacks are printed as usual.
    """
    try:
        return _run_quietly(work, log_path, verbose)
    finally:
        if not verbose:
            # The process ends after this: Prefect's temporary server and its event worker say goodbye
            # from exit hooks, after the terminal was given back, and people need not read it.
            for name in ("prefect", "EventsWorker", "APILogWorker"):
                logging.getLogger(name).setLevel(logging.ERROR)


def _run_quietly(work: Callable[[], int], log_path: Path, verbose: bool) -> int:
    from flows.prefect_server import tie_temporary_server
    from tasks.common.errors import InputError, UnreachableError

    with console(log_path, verbose=verbose) as terminal, patient_prefect():
        try:
            check_prefect_api()
            tie_temporary_server()  # a command killed with kill -9 leaves no Prefect server behind
            return work()
        except (InputError, UnreachableError) as error:
            logging.getLogger("flows").info("Stopped: %s", error, exc_info=True)
            first, *details = str(error).splitlines()  # details (e.g. each failed expectation) are in the log
            if verbose:
                print(f"error: {error}", file=terminal)
            else:
                more = f"; {len(details)} more line(s) of detail" if details else ""
                print(f"error: {first} (full log{more}: {log_path})", file=terminal)
            return 2
        except KeyboardInterrupt:
            print(f"error: interrupted (full log: {log_path})", file=terminal)
            return 130
        except Exception as error:
            if verbose:
                raise
            logging.getLogger("flows").error("Unexpected failure", exc_info=True)
            print(f"error: unexpected {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
                  f"(traceback in {log_path}; --verbose shows it here)", file=terminal)
            return 1
