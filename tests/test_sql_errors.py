"""Backend trouble is a retryable 503, never a 500: classification of driver errors."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError

from agentbus.store.sql import _is_transient


class FakePgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"pg error {sqlstate}")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "transient"),
    [
        ("53300", True),  # too_many_connections
        ("08006", True),  # connection_failure
        ("57P01", True),  # admin_shutdown
        ("57P03", True),  # cannot_connect_now
        ("40001", True),  # serialization_failure
        ("40P01", True),  # deadlock_detected
        ("23505", False),  # unique_violation: a bug or bad input, not an outage
        ("22P02", False),  # invalid_text_representation
    ],
)
def test_postgres_sqlstate_classification(sqlstate: str, transient: bool) -> None:
    exc = DBAPIError("stmt", {}, FakePgError(sqlstate))
    assert _is_transient(exc) is transient


@pytest.mark.parametrize(
    ("message", "transient"),
    [("database is locked", True), ("disk I/O error", True), ("no such table: shards", False)],
)
def test_sqlite_message_classification(message: str, transient: bool) -> None:
    exc = DBAPIError("stmt", {}, Exception(message))
    assert _is_transient(exc) is transient
