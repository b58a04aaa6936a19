"""GPU memory and utilisation through NVML, behind one small class.

All NVML calls go through the module-level ``pynvml`` name (nvidia-ml-py), so a test replaces the handful
of functions used here (``nvmlInit``, ``nvmlShutdown``, ``nvmlDeviceGetCount``,
``nvmlDeviceGetHandleByIndex``, ``nvmlDeviceGetName``, ``nvmlDeviceGetMemoryInfo``,
``nvmlDeviceGetUtilizationRates``) and nothing else needs to know. A node without NVML (no driver, a
CPU box, a container without the library) is normal rather than an error: the reader says so once and
then reports no GPU figures. A failing GPU is reported beside the GPUs that still answer, because one
lost device must not hide the memory of the others.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cortex.agent.protocol import GpuReport

try:
    import pynvml
except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency, but a broken install must not crash
    pynvml = None

__all__ = ["GpuReading", "NvmlReader"]

log = logging.getLogger(__name__)

_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One read of every selected GPU."""

    nvml: bool
    """Whether NVML is usable on this machine."""
    gpus: tuple[GpuReport, ...] = ()
    error: str = ""
    """What could not be read (per GPU, joined with ``; ``), or why NVML is unavailable."""


@dataclass(slots=True)
class NvmlReader:
    """Reads total/used memory (MiB), utilisation and name of every GPU or a chosen subset.

    Call :meth:`start` once, :meth:`read` as often as needed (blocking: a few milliseconds, run it in a
    thread), and :meth:`close` at the end. Whoever calls :meth:`start` calls :meth:`close`.

    Args:
        indices: NVML device indices to read (``--gpus 0,1``); None reads every device.
    """

    indices: Sequence[int] | None = None
    _started: bool = field(default=False, init=False)
    _unavailable: str = field(default="", init=False)

    @property
    def available(self) -> bool:
        """Whether NVML initialised."""
        return self._started

    def start(self) -> bool:
        """Initialise NVML; on failure log one warning and stay unavailable.

        Returns:
            Whether NVML is usable.
        """
        if self._started:
            return True
        if pynvml is None:
            self._unavailable = "NVML unavailable: nvidia-ml-py (pynvml) is not installed"
        else:
            try:
                pynvml.nvmlInit()
            except Exception as exc:  # NVMLError, or OSError from a broken library
                self._unavailable = f"NVML unavailable: {_describe(exc)}"
            else:
                self._started = True
                return True
        log.warning("%s; reporting no GPU figures", self._unavailable)
        return False

    def close(self) -> None:
        """Shut NVML down if :meth:`start` initialised it."""
        if not self._started or pynvml is None:
            return
        self._started = False
        try:
            pynvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvmlShutdown failed: %s", _describe(exc))

    def read(self) -> GpuReading:
        """Read the selected GPUs. Never raises: failures end up in :attr:`GpuReading.error`."""
        if not self._started or pynvml is None:
            return GpuReading(nvml=False, error=self._unavailable or "NVML not started")
        errors: list[str] = []
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        except Exception as exc:
            return GpuReading(nvml=True, error=f"device count: {_describe(exc)}")
        wanted = list(range(count)) if self.indices is None else list(self.indices)
        gpus: list[GpuReport] = []
        for index in wanted:
            if not 0 <= index < count:
                errors.append(f"GPU {index}: not present ({count} devices)")
                continue
            try:
                gpus.append(self._read_one(index))
            except Exception as exc:
                errors.append(f"GPU {index}: {_describe(exc)}")
        return GpuReading(nvml=True, gpus=tuple(gpus), error="; ".join(errors))

    @staticmethod
    def _read_one(index: int) -> GpuReport:
        assert pynvml is not None
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            name = _text(pynvml.nvmlDeviceGetName(handle))
        except Exception:
            name = ""
        try:
            util: float | None = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # NOT_SUPPORTED on some devices (MIG, vGPU): not worth an error
            util = None
        return GpuReport(
            index=index,
            name=name[:512],
            total_mb=int(memory.total) // _MIB,
            used_mb=int(memory.used) // _MIB,
            util_pct=util if util is None or 0 <= util <= 100 else None,
        )


def _text(value: Any) -> str:
    """NVML names are bytes in old nvidia-ml-py releases and str in new ones."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _describe(exc: BaseException) -> str:
    """A one-line description of an NVML failure, with its class name when the message is empty."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
