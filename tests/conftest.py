"""Shared pytest options: ``--device`` picks where the op matrix runs; ``--run-slow`` adds slow cases."""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for op tests: cpu (default) or cuda")
    parser.addoption(
        "--run-slow", action="store_true", default=False, help="also run @pytest.mark.slow tests"
    )


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow") or "slow" in (config.getoption("-m") or "")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="gpu: no CUDA device available"))


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda requested but no CUDA device is available")
    return torch.device(name)
