"""engine/pdl.py: which launches go with programmatic dependent launch. Its effect on the arithmetic (none) is
checked on a GPU (test_gpu.py); that every kernel compiles with it for an H100, in test_kernels_compile.py."""
import pytest
import torch

from engine import pdl


def test_pdl_is_off_on_a_cpu():
    assert not pdl.enabled(torch.device("cpu"))


def test_pdl_is_on_by_default_where_supported_and_the_pdl_setting_turns_it_off(monkeypatch):
    monkeypatch.setattr(pdl, "_supported", lambda device: True)
    monkeypatch.delenv("PDL", raising=False)
    assert pdl.enabled(torch.device("cuda"))
    monkeypatch.setenv("PDL", "false")
    assert not pdl.enabled(torch.device("cuda"))


def test_a_mistyped_pdl_setting_is_an_error_that_names_it(monkeypatch):
    monkeypatch.setattr(pdl, "_supported", lambda device: True)
    monkeypatch.setenv("PDL", "flase")
    with pytest.raises(ValueError, match="PDL must be true or false"):
        pdl.enabled(torch.device("cuda"))
