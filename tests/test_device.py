"""dtype = auto: bfloat16 where the device runs it natively, float32 elsewhere (the capability queries mocked:
nothing is timed here)."""

import pytest
import torch

from model import device as D

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def cpu_reports(monkeypatch, reported: bool, speedup: float):
    monkeypatch.setattr(D, "cpu_bf16_reported", lambda: reported)
    monkeypatch.setattr(D, "cpu_bf16_speedup", lambda: speedup)


def test_auto_is_float32_on_a_cpu_without_native_bfloat16(monkeypatch):
    cpu_reports(monkeypatch, reported=False, speedup=0.07)
    p = D.resolve_precision("auto", CPU)
    assert p.dtype == "float32" and p.asked == "auto" and "no native bfloat16" in p.reason


def test_auto_is_bfloat16_on_a_cpu_with_native_bfloat16(monkeypatch):
    cpu_reports(monkeypatch, reported=True, speedup=3.6)
    p = D.resolve_precision("auto", CPU)
    assert p.dtype == "bfloat16" and "3.6x the float32 speed" in p.reason


def test_auto_believes_the_measurement_when_the_report_says_native_but_bfloat16_is_slow(monkeypatch):
    cpu_reports(monkeypatch, reported=True, speedup=0.9)
    p = D.resolve_precision("auto", CPU)
    assert p.dtype == "float32" and "only 0.90x" in p.reason


def test_an_explicit_bfloat16_on_a_cpu_that_emulates_it_runs_with_a_warning_naming_the_slowdown(monkeypatch):
    cpu_reports(monkeypatch, reported=False, speedup=0.075)
    with pytest.warns(UserWarning, match=r"emulated, and a matmul ran 13x slower than in float32"):
        p = D.resolve_precision("bfloat16", CPU)
    assert p.dtype == "bfloat16" and "emulated" in p.reason


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_on_cuda_follows_the_gpus_native_bfloat16(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Test GPU")
    p = D.resolve_precision("auto", CUDA)
    assert p.dtype == expected and p.reason.startswith("NVIDIA Test GPU")


def test_float16_only_when_asked_and_explicit_dtypes_are_kept(monkeypatch):
    cpu_reports(monkeypatch, reported=True, speedup=3.0)
    assert D.resolve_precision("float16", CPU).dtype == "float16"
    assert D.resolve_precision("float32", CPU).dtype == "float32"
    with pytest.raises(ValueError, match="'bf16' is not one of auto, float32, bfloat16, float16"):
        D.resolve_precision("bf16", CPU)


def test_the_real_cpu_query_answers_without_error():
    assert D.resolve_precision("auto", CPU).dtype in ("float32", "bfloat16")
