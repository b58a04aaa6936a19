from __future__ import annotations

import logging

import pynvml
import pytest

from cortex.agent import nvml as nvml_module
from cortex.agent.nvml import NvmlReader
from tests.agent.fakes import FakeGpu, FakeNvml


def test_reads_every_gpu_in_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml([FakeGpu(b"NVIDIA A100", 81_920, 1_024, util=37), FakeGpu("NVIDIA L4", 23_034, 0, util=None)])
    fake.install(monkeypatch)
    reader = NvmlReader()
    assert reader.start()
    reading = reader.read()
    reader.close()

    assert reading.nvml is True
    assert reading.error == ""
    assert [(g.index, g.name, g.total_mb, g.used_mb, g.util_pct) for g in reading.gpus] == [
        (0, "NVIDIA A100", 81_920, 1_024, 37.0),
        (1, "NVIDIA L4", 23_034, 0, None),  # utilisation not supported is not an error
    ]
    assert (fake.inits, fake.shutdowns) == (1, 1)


def test_a_failing_gpu_is_reported_beside_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([FakeGpu("A", 1000, 10), FakeGpu("B", 2000, 20, broken=True)]).install(monkeypatch)
    reader = NvmlReader()
    reader.start()

    reading = reader.read()

    assert reading.nvml is True
    assert [g.index for g in reading.gpus] == [0]
    assert reading.gpus[0].used_mb == 10
    assert reading.error.startswith("GPU 1: ")
    assert "lost" in reading.error.lower()


def test_reads_only_the_chosen_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([FakeGpu("A", 1000, 10), FakeGpu("B", 2000, 20), FakeGpu("C", 3000, 30)]).install(monkeypatch)
    reader = NvmlReader(indices=(2, 0, 7))
    reader.start()

    reading = reader.read()

    assert [(g.index, g.name) for g in reading.gpus] == [(2, "C"), (0, "A")]
    assert reading.error == "GPU 7: not present (3 devices)"


def test_without_nvml_it_warns_once_and_reports_no_figures(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    FakeNvml(init_error=pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)).install(monkeypatch)
    caplog.set_level(logging.WARNING, logger="cortex.agent.nvml")
    reader = NvmlReader()

    assert reader.start() is False
    first, second = reader.read(), reader.read()
    reader.close()

    assert first.nvml is False
    assert first.gpus == ()
    assert "NVML unavailable" in first.error
    assert "Library Not Found" in first.error
    assert second == first
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "reporting no GPU figures" in warnings[0].getMessage()


def test_without_the_pynvml_module(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(nvml_module, "pynvml", None)
    caplog.set_level(logging.WARNING, logger="cortex.agent.nvml")
    reader = NvmlReader()

    assert reader.start() is False
    reading = reader.read()

    assert reading.nvml is False
    assert "not installed" in reading.error
    assert len(caplog.records) == 1


def test_device_count_failure_is_an_error_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([FakeGpu("A", 1000, 10)]).install(monkeypatch)

    def count() -> int:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", count)
    reader = NvmlReader()
    reader.start()

    reading = reader.read()

    assert reading.nvml is True
    assert reading.gpus == ()
    assert reading.error.startswith("device count: ")
