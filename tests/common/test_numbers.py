"""Numbers in lines people read: 4 decimals, and a word instead of a crash when there is no number."""

from __future__ import annotations

import numpy as np

from tasks.common.numbers import decimals4


def test_metrics_show_four_decimals_and_missing_ones_say_so():
    assert decimals4(0.9993650793650793) == "0.9994"
    assert decimals4(np.float32(1.0)) == "1.0000" and decimals4(3) == "3.0000"
    assert [decimals4(value) for value in (None, float("nan"), "auc", True)] == ["n/a"] * 4
