"""One METEOR JVM for the whole test session (it costs seconds to start); closed at interpreter exit."""

import atexit

import pytest

_scorer = None


def shared_meteor():
    """The session's MeteorScorer, or a skip when Java is missing on this machine."""
    global _scorer
    if _scorer is None:
        import shutil

        if shutil.which("java") is None:
            pytest.skip("java is not installed: METEOR (pycocoevalcap's jar) cannot run")
        from medvlm.metrics import MeteorScorer

        _scorer = MeteorScorer(timeout_s=120)
        atexit.register(_scorer.close)
    return _scorer
