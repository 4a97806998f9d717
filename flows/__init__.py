"""Prefect flows: orchestration only. Each task calls one stage (a DVC stage or a medvlm stage function)."""
