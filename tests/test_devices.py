"""Device setup: a clean no-op on CPU, and the GPU branch exercised with a stand-in device list.

CI has no GPU, so the GPU branch is driven by replacing TensorFlow's device listing; the
calls it makes (memory growth, dtype policy, probing) are the real ones.
"""

from __future__ import annotations

import keras
import pytest
import tensorflow as tf

import tasks.devices as devices


@pytest.fixture(autouse=True)
def _restore_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_cpu_configuration_is_float32_and_repeatable():
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    first = devices.configure_devices()
    second = devices.configure_devices(mixed_precision=True)
    assert first == {"gpus": 0, "device": "CPU", "policy": "float32", "mixed_precision": False}
    assert second["policy"] == "float32" and second["mixed_precision"] is False
    assert keras.mixed_precision.global_policy().name == "float32"


class _FakeGpu:
    name = "/physical_device:GPU:0"
    device_type = "GPU"


def test_gpu_branch_sets_memory_growth_and_mixed_precision_and_survives_a_second_call(monkeypatch):
    calls = []

    def set_memory_growth(device, enabled):
        calls.append((device.name, enabled))
        if len(calls) > 1:
            raise RuntimeError("Physical devices cannot be modified after being initialized")

    monkeypatch.setattr(devices.tf.config, "list_physical_devices", lambda kind=None: [_FakeGpu()])
    monkeypatch.setattr(devices.tf.config.experimental, "set_memory_growth", set_memory_growth)
    info = devices.configure_devices(mixed_precision=True)
    assert info == {"gpus": 1, "device": "GPU", "policy": "mixed_float16", "mixed_precision": True}
    assert keras.mixed_precision.global_policy().name == "mixed_float16"
    again = devices.configure_devices(mixed_precision=False)
    assert again["policy"] == "float32" and again["device"] == "GPU"
    assert calls == [("/physical_device:GPU:0", True)] * 2


def test_batch_size_is_the_fixed_default_on_cpu(monkeypatch):
    monkeypatch.setattr(devices, "gpu_available", lambda: False)
    assert devices.pick_batch_size(lambda x: pytest.fail("no probing on CPU"), 32) == devices.CPU_BATCH_SIZE


def test_batch_probe_on_gpu_returns_the_largest_batch_that_ran(monkeypatch):
    monkeypatch.setattr(devices, "gpu_available", lambda: True)
    seen = []

    def forward(batch):
        seen.append(len(batch))
        if len(batch) > 128:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")

    assert devices.pick_batch_size(forward, 16) == 128
    assert seen == [32, 64, 128, 256]
    assert devices.pick_batch_size(lambda x: None, 16, max_batch=64) == 64
