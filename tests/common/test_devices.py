"""Devices and precision: a clean answer on this CPU, and the GPU rules exercised with stand-in devices.

CI has no GPU, so the GPU branches are driven by passing the device list the backend would
report; the rules they apply (compute capability 8.0+, OOM back-off) are real. What a CPU's
"auto" measures is tests/learning/test_precision.py.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tasks.common import devices

pytestmark = pytest.mark.backends  # runs on TensorFlow and again on JAX (see README's test command)


def test_this_cpu_asks_the_measurement_under_auto_and_never_when_forced():
    setup = devices.configure_devices("auto")
    assert setup.backend == keras.config.backend() and setup.device == "CPU" and setup.gpus == 0
    assert setup.precision == "float32" and "until bfloat16 is measured" in setup.reason  # nothing to time with
    measured = devices.configure_devices("auto", measure=lambda: ("bfloat16", "measured 1.4x"))
    assert measured.precision == "bfloat16" and measured.reason == "measured 1.4x"
    forced = devices.configure_devices("float32", measure=lambda: pytest.fail("a forced precision is never measured"))
    assert forced.precision == "float32" and "configured" in forced.reason
    assert keras.config.dtype_policy().name == "float32"  # configuring never changes the global policy


@pytest.mark.parametrize("gpus, expected, words", [
    ((("NVIDIA H200", (9, 0)),), "bfloat16", "compute capability"),
    ((("NVIDIA A100", (8, 0)), ("NVIDIA A100", (8, 0))), "bfloat16", "A100"),
    ((("Tesla T4", (7, 5)),), "float32", "below 8.0"),
])
def test_auto_precision_on_a_gpu_follows_its_compute_capability_without_measuring(gpus, expected, words):
    precision, why = devices.choose_precision("auto", gpu_list=gpus, measure=lambda: pytest.fail("GPUs go by rule"))
    assert precision == expected and words in why


def test_forced_and_unknown_precisions():
    assert devices.choose_precision("float32", gpu_list=(("H200", (9, 0)),))[0] == "float32"
    assert devices.choose_precision("bfloat16", gpu_list=())[0] == "bfloat16"
    from tasks.common.errors import ConfigError

    with pytest.raises(ConfigError, match="--precision"):
        devices.choose_precision("float16")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512_bf16 amx_bf16\n")
    assert devices.cpu_flags(info) >= {"avx512_bf16", "amx_bf16"}
    assert devices.cpu_flags(tmp_path / "missing") == frozenset()


def test_dtype_policy_is_scoped_to_the_build():
    with devices.dtype_policy("bfloat16"):
        inside = keras.layers.Dense(2)
    outside = keras.layers.Dense(2)
    assert inside.dtype_policy.name == "mixed_bfloat16" and inside.compute_dtype == "bfloat16"
    assert inside.variable_dtype == "float32"  # mixed: bf16 compute, float32 weights
    assert outside.dtype_policy.name == "float32" and keras.config.dtype_policy().name == "float32"


def test_batch_size_is_the_fixed_default_on_cpu():
    assert devices.pick_batch_size(lambda x: pytest.fail("no probing on CPU"), 32, on_gpu=False) \
        == devices.CPU_BATCH_SIZE


def test_batch_probe_on_gpu_backs_off_on_out_of_memory_of_any_backend():
    seen = []

    def forward(batch: np.ndarray) -> None:
        assert batch.dtype == np.uint8  # batches cross to the device as uint8
        seen.append(len(batch))
        if len(batch) > 256:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB")  # XLA's words

    assert devices.pick_batch_size(forward, 16, on_gpu=True) == 128  # the largest that ran, halved for headroom
    assert seen == [32, 64, 128, 256, 512]
    assert devices.pick_batch_size(lambda x: None, 16, on_gpu=True, max_batch=64) == 64


def test_batch_probe_does_not_swallow_other_errors():
    def broken(batch: np.ndarray) -> None:
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        devices.pick_batch_size(broken, 16, on_gpu=True)


@pytest.mark.parametrize("error, oom", [
    (RuntimeError("RESOURCE_EXHAUSTED: out of memory"), True),
    (MemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (type("ResourceExhaustedError", (Exception,), {})("OOM when allocating tensor"), True),
    (ValueError("bad shape"), False),
])
def test_out_of_memory_is_recognised_across_backends(error, oom):
    assert devices.is_out_of_memory(error) is oom
