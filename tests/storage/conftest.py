"""Fixtures of the storage tests."""

from __future__ import annotations

import pytest
from storage_helpers import Child


@pytest.fixture
def spawn():
    """spawn(code, *args) -> Child; every child is killed and reaped after the test."""
    children: list[Child] = []

    def make(code: str, *args) -> Child:
        children.append(Child(code, *args))
        return children[-1]

    yield make
    for child in children:
        child.stop()
