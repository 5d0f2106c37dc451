"""Local mode's fixtures: `caffeserve up` processes, each killed (servers included) after its test."""

from __future__ import annotations

import pytest

from caffe_testing.local import UpProcess


@pytest.fixture
def up_processes():
    started: list[UpProcess] = []

    def start(*args: str) -> UpProcess:
        p = UpProcess(*args)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
