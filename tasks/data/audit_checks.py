"""The data audit's expectations: Great Expectations over one row per audited image.

The audit (tasks/learning/audit.py) marks each labelled image: suspected of a wrong label, or a
test image that is a near-copy of a training image. Two expectations judge the shares, in
the same style (and with the same helpers) as the manifest suite in tasks/data/validate.py:

* `label_issue_share` (severity warning): the share of suspected label errors stays at or below
  `max_label_issue_share`. Real datasets hold some; many more say the labels or the classes
  are confused, which a person should look at, but the run goes on.
* `leaked_test_share` (severity critical): the share of test images that are near-copies of
  training images stays at or below `max_leaked_test_share`. Those images are left out of
  the gate's test metrics anyway; more than that share says the splits do not separate the
  data, and every test number would flatter the model, so the run stops before training.

The result JSON and a Data Docs page are kept beside the audit's report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from pydantic import BaseModel

from tasks.common.errors import DatasetValidationError
from tasks.data.validate import _context, _expect, _quiet_gx, _run_suite, brief_failures, failure_lines

RESULT_FILE = "result.json"
DATA_DOCS_DIR = "data_docs"
SUITE = "data_audit"

OPTION_OF_CHECK = {"label_issue_share": "--max-label-issue-share", "leaked_test_share": "--max-leaked-test-share"}


class AuditVerdict(BaseModel):
    """What the audit's expectations said: warnings go on, failures stop the run."""

    warnings: list[str]
    failures: list[str]

    def raise_if_failed(self, report_csv: str) -> None:
        """Stop the run with the numbers, where the findings are and what to change."""
        if not self.failures:
            return
        checks = sorted({line.split(":", 1)[0] for line in self.failures})
        options = ", ".join(OPTION_OF_CHECK[check] for check in checks if check in OPTION_OF_CHECK)
        raise DatasetValidationError(
            f"The data audit failed ({'; '.join(self.failures)}): test images that are near-copies of training "
            f"images are listed in {report_csv}; exclude them or their training copies with a labels.csv, or "
            f"loosen the check with {options}.")


def _expectations(gx: object, max_label_issue_share: float, max_leaked_test_share: float) -> list:
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations  # type: ignore[attr-defined]
    return [
        _expect(E.ExpectColumnMeanToBeBetween, "label_issue_share",
                "At most this share of the audited images is suspected of a wrong label.",
                column="label_issue", min_value=0.0, max_value=max_label_issue_share, severity="warning"),
        _expect(E.ExpectColumnMeanToBeBetween, "leaked_test_share",
                "At most this share of the test images are near-copies of training images.",
                column="leaked", min_value=0.0, max_value=max_leaked_test_share, severity="critical",
                row_condition=Column("split") == "test"),
    ]


def check_audit(flags: pd.DataFrame, out_dir: Path, max_label_issue_share: float,
                max_leaked_test_share: float) -> AuditVerdict:
    """Run the two expectations over `flags` (columns split, label_issue 0/1, leaked 0/1).

    The result (RESULT_FILE) and Data Docs go to `out_dir`, a folder of the audit's that its
    caller writes whole. Without test rows the leak check is left out (nothing to leak into).
    """
    gx = _quiet_gx()
    context = _context(gx, out_dir / DATA_DOCS_DIR)
    expectations = _expectations(gx, max_label_issue_share, max_leaked_test_share)
    if not (flags["split"] == "test").any():
        expectations = expectations[:1]
    result = _run_suite(gx, context, SUITE, flags, expectations, ["split"])
    validations = {SUITE: result.to_json_dict()}
    severity = {(r.get("expectation_config") or {}).get("meta", {}).get("check"):
                (r.get("expectation_config") or {}).get("severity", "critical")
                for r in validations[SUITE].get("results", [])}
    briefs = brief_failures(validations)
    warnings = [line for line in briefs if severity.get(line.split(":", 1)[0]) == "warning"]
    failures = [line for line in briefs if line not in warnings]
    stored = {"success": not failures, "warnings": warnings, "failures": failures,
              "failed": failure_lines(validations), "validations": validations}
    (out_dir / RESULT_FILE).write_text(json.dumps(stored, indent=2, sort_keys=True, default=str) + "\n")
    context.build_data_docs()
    return AuditVerdict(warnings=warnings, failures=failures)
