"""The connection status rule: which statuses leave a connection unusable, and the 424 it gets."""

from __future__ import annotations

import pytest

from proxy.errors import ConnectionNotAuthorized
from proxy.model import NOT_CONNECTED, ConnectionRecord, ConnectionStatus, not_authorized


@pytest.mark.parametrize(
    ("status", "unusable"),
    [
        (ConnectionStatus.PENDING, True),
        (ConnectionStatus.NEEDS_REAUTH, True),
        (ConnectionStatus.ACTIVE, False),
        (ConnectionStatus.ERROR, False),  # its credentials exist: the Connection Service serves them
    ],
)
def test_needs_connecting(status: ConnectionStatus, unusable: bool) -> None:
    record = ConnectionRecord("t1", "c1", "http_bearer", status=status.value)
    assert record.needs_connecting is unusable
    assert (status.value in NOT_CONNECTED) is unusable


@pytest.mark.parametrize(
    ("status", "says"),
    [
        ("pending", "is not connected yet"),
        ("needs_reauth", "needs to be reconnected"),
        ("error", "is in error"),
    ],
)
def test_not_authorized_says_what_to_do(status: str, says: str) -> None:
    record = ConnectionRecord("t1", "c1", "crm", status=status, status_detail="why")
    exc = not_authorized(record)
    assert isinstance(exc, ConnectionNotAuthorized) and exc.status == 424
    assert (
        says in exc.message and "(why)" in exc.message and "/admin/tenants/t1/connections/c1" in exc.message
    )
