"""A person's label corrections: `labels.csv` in the source or the data folder, honoured by prepare.

The data audit (tasks/learning/audit.py) only suspects; a person decides. The decision comes back
as a CSV that names images and says what to do with each:

    sha256 | path          the image: its content hash, or its path in the source (the manifest's
                           `relative_path`, e.g. `PetImages/Cat/12.jpg`) or in the data folder
                           (`arranged/train/cats/12_ab12cd34ef.jpg`)
    label | decision       a class name (the image's label from now on), `exclude` (left out of every
                           split), `relabel` (the row's `suggested_label`), or empty / `keep` (nothing)

Other columns are ignored, so the audit's own CSV (data/quality/<feature space>/audit.csv, whose
`decision` column is left empty for this) is a valid override once its decisions are filled in.
Overrides act on image content: a path is resolved to its sha256, so every copy of the bytes
follows the decision. They are applied before deduplication and splitting, which then see the
corrected labels; the dataset fingerprint covers every kept (sha256, label, split), so a
correction changes it and the next retrain trains.

A file in the source (`<source>/labels.csv`) travels with the data; one in the data folder
(`data/labels.csv`) belongs to this copy of it and wins where both name an image.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tasks.common.errors import InputError
from tasks.common.labels import ClassMap, normalise_class_name
from tasks.common.results import LabelOverrides
from tasks.data.datafolder import DataFolder

OVERRIDES_FILE = "labels.csv"
EXCLUDE = "exclude"
RELABEL = "relabel"
KEEP = frozenset({"", "keep"})
EXCLUDED = "excluded"
"""Quarantine reason of an image a person excluded."""

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ARRANGED_HASH = 10  # arranged file names end in _<sha256[:10]> (tasks/data/arrange.py, arranged_paths)
_ARRANGED = re.compile(rf"^{DataFolder.ARRANGED}/.+_([0-9a-f]{{{_ARRANGED_HASH}}})\.jpg$")
_ACTION_COLUMNS = ("label", "decision")


@dataclass(frozen=True)
class Override:
    """One row of a labels.csv that asks for something: where it is, which image, what to do."""

    where: str
    """`labels.csv line 7`: for the sentence that names a bad row."""
    sha256: str
    path: str
    action: str
    """A class name, or EXCLUDE."""


def override_files(source_root: str | Path | None, folder: DataFolder) -> list[Path]:
    """The labels.csv files that apply: the source's, then the data folder's (which wins)."""
    places = [Path(source_root) / OVERRIDES_FILE] if source_root else []
    return [path for path in (*places, folder.label_overrides) if path.is_file()]


def _action(raw: str, suggested: str, where: str, classes: ClassMap) -> str | None:
    """What a row asks for (a class name or EXCLUDE), None for nothing; InputError for a word that is neither."""
    word = raw.strip()
    if word.lower() in KEEP:
        return None
    if word.lower() == EXCLUDE:
        return EXCLUDE
    if word.lower() == RELABEL:
        word = suggested.strip()
        if not word:
            raise InputError(f"{where} says relabel but has no suggested_label; write the class name instead.")
    name = normalise_class_name(word)
    if name not in classes.names:
        raise InputError(f"{where} names the class {word!r}, which this data does not have; write one of "
                         f"{', '.join(classes.names)}, {EXCLUDE}, {RELABEL} or leave it empty.")
    return name


def read_override_file(path: Path, classes: ClassMap) -> list[Override]:
    """The rows of one labels.csv that ask for something, checked: InputError names the file, line and fix."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{path} cannot be read as CSV ({type(error).__name__}: {str(error).splitlines()[0][:120]}); "
                         "save it as a comma-separated file with a header row.") from None
    columns = {column.strip().lower(): column for column in frame.columns}
    action_column = next((columns[name] for name in _ACTION_COLUMNS if name in columns), None)
    if action_column is None or not ({"sha256", "path"} & set(columns)):
        raise InputError(f"{path} needs a sha256 or path column and a label (or decision) column; "
                         f"it has {', '.join(frame.columns) or 'none'}.")
    overrides = []
    for number, row in enumerate(frame.to_dict("records"), start=2):  # line 1 is the header
        where = f"{path} line {number}"
        action = _action(row[action_column], row.get(columns.get("suggested_label", ""), ""), where, classes)
        if action is None:
            continue
        sha = row.get(columns.get("sha256", ""), "").strip().lower()
        relative = row.get(columns.get("path", ""), "").strip().removeprefix("./")
        if sha and not _SHA256.match(sha):
            raise InputError(f"{where} has sha256 {sha!r}, which is not a sha256 (64 hex digits); fix it or leave "
                             "it empty and name the image by path.")
        if not sha and not relative:
            raise InputError(f"{where} names no image; give its sha256 or path.")
        overrides.append(Override(where, sha, relative, action))
    return overrides


def read_overrides(paths: Sequence[Path], classes: ClassMap) -> list[Override]:
    """Every file's rows, in order (later files win)."""
    return [override for path in paths for override in read_override_file(Path(path), classes)]


def _arranged_sha(path: str, by_prefix: dict[str, set[str]]) -> str:
    """The image an arranged path names (`arranged/<split>/<class>/<stem>_<sha256[:10]>.jpg`), by its hash.

    By the hash in its name, not the path itself: an earlier correction may have moved the image
    to another class folder since the path was written down.
    """
    found = _ARRANGED.match(path)
    matches = by_prefix.get(found.group(1), set()) if found else set()
    return next(iter(matches)) if len(matches) == 1 else ""


def _decisions(frame: pd.DataFrame, overrides: Sequence[Override]) -> tuple[dict[str, tuple[str, str]], int]:
    """{image sha256: (action, where)} with later files winning, and how many rows named no image.

    Two rows of one file that decide one image differently are refused (which one meant it?).
    """
    labelled = frame[frame["label"] != ""]
    by_path = dict(zip(labelled["relative_path"], labelled["sha256"]))
    by_prefix: dict[str, set[str]] = {}
    for sha in labelled["sha256"]:
        by_prefix.setdefault(sha[:_ARRANGED_HASH], set()).add(sha)
    known = set(labelled["sha256"])
    decided: dict[str, tuple[str, str]] = {}
    unmatched = 0
    for override in overrides:
        sha = override.sha256 or by_path.get(override.path, "") or _arranged_sha(override.path, by_prefix)
        if sha not in known:
            unmatched += 1
            continue
        earlier = decided.get(sha)
        same_file = earlier is not None and earlier[1].rsplit(" line ", 1)[0] == override.where.rsplit(" line ", 1)[0]
        if same_file and earlier[0] != override.action:
            raise InputError(f"{override.where} decides {override.action!r} for an image that {earlier[1]} "
                             f"decides {earlier[0]!r}; keep one decision per image.")
        decided[sha] = (override.action, override.where)
    return decided, unmatched


def apply_overrides(frame: pd.DataFrame, overrides: Sequence[Override],
                    files: Sequence[Path]) -> tuple[pd.DataFrame, LabelOverrides]:
    """The manifest with the decisions applied to every labelled copy of each image, and what changed.

    Relabelled rows get the new label; excluded ones are quarantined as `excluded` (those
    already quarantined for a fault keep their reason). Pure: `frame` is not modified.
    """
    out = frame.copy()
    decided, unmatched = _decisions(out, overrides)
    labelled = out["label"] != ""
    relabelled = excluded = 0
    for sha, (action, _) in decided.items():
        rows = labelled & (out["sha256"] == sha)
        if action == EXCLUDE:
            ok = rows & (out["status"] == "ok")
            excluded += int(ok.any())
            out.loc[ok, "status"] = "quarantined"
            out.loc[ok, "reason"] = EXCLUDED
        else:
            relabelled += int((out.loc[rows, "label"] != action).any())
            out.loc[rows, "label"] = action
    digest = hashlib.sha256("".join(f"{sha},{action}\n" for sha, (action, _) in sorted(decided.items())).encode())
    return out, LabelOverrides(files=[str(path) for path in files], digest=digest.hexdigest(),
                               relabelled=relabelled, excluded=excluded, unmatched=unmatched)
