"""Shared set-up of the pytest-benchmark suites: the device and dtype the CLI would pick,
and the ``shape`` parameter, taken from the same sweeps as ``fastpeft-bench --shapes``
(``--bench-shapes quick``, the default: the first shape of each op)."""

from __future__ import annotations

import pytest

from fastpeft.bench.runner import SWEEPS, default_device, default_dtype, shapes_for

DEVICE = default_device()
DTYPE = default_dtype(DEVICE)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bench-shapes", choices=SWEEPS, default="quick",
                     help="fastpeft shape sweep: full, quick (first shape) or tiny (smoke test)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "shape" in metafunc.fixturenames:
        sweep = metafunc.config.getoption("--bench-shapes")
        shapes = shapes_for(metafunc.module.CASE, DEVICE, sweep)
        metafunc.parametrize("shape", shapes, ids=str, scope="module")


@pytest.fixture(scope="module")
def case(request: pytest.FixtureRequest, shape):
    """The module's case (``CASE``, a ``fastpeft.bench`` case module) built at ``shape``."""
    return request.module.CASE.build(shape, DTYPE, DEVICE)


@pytest.fixture(scope="session")
def device():
    return DEVICE
