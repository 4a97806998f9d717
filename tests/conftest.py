"""Shared test helpers. Real-data tests read ../shared (or $MEDVLM_SHARED) and skip with a reason when absent."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDVLM_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


def require_shared(*parts: str) -> Path:
    """Path under the shared folder, or skip the test saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (set MEDVLM_SHARED to the shared folder)")
    return path
