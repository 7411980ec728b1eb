"""Python client for agentbus: shared, versioned state with conflict detection, and the model broker.

    from agentbus_sdk import Client

    with Client(agent_id="planner") as bus:
        plan = bus.space("demo")
        plan.commit({"plan": {"steps": ["design"]}})
        plan.transact(lambda tx: tx.put("plan", {"steps": [*tx.read("plan").value["steps"], "build"]}))

``Client`` is synchronous, ``AsyncClient`` the same with ``await``. See README.md.
"""

from agentbus_sdk._async_client import AsyncClient, AsyncEventStream, AsyncSpace
from agentbus_sdk._base import Backoff
from agentbus_sdk._client import Client, EventStream, Space
from agentbus_sdk._errors import (
    AgentbusError,
    AuthError,
    BadRequest,
    BudgetExceeded,
    ConflictError,
    ConnectionFailed,
    ForbiddenError,
    NotFoundError,
    RateLimited,
    ReadSetExpired,
    Unavailable,
    UpstreamError,
    error_from_response,
)
from agentbus_sdk._models import (
    DELETE,
    Budget,
    BudgetScope,
    CommitEvent,
    CommitResult,
    Conflict,
    Identity,
    RangeRead,
    Read,
    ReadSet,
    Shard,
    ShardInfo,
    ShardVersion,
    SpaceInfo,
    Write,
    WrittenKey,
)
from agentbus_sdk._openai import error_from_openai
from agentbus_sdk._transaction import AsyncAttempt, AsyncRetrying, AsyncTransaction, Attempt, Retrying, Transaction

__version__ = "0.1.0"

__all__ = [
    "DELETE",
    "AgentbusError",
    "AsyncAttempt",
    "AsyncClient",
    "AsyncEventStream",
    "AsyncRetrying",
    "AsyncSpace",
    "AsyncTransaction",
    "Attempt",
    "AuthError",
    "Backoff",
    "BadRequest",
    "Budget",
    "BudgetExceeded",
    "BudgetScope",
    "Client",
    "CommitEvent",
    "CommitResult",
    "Conflict",
    "ConflictError",
    "ConnectionFailed",
    "EventStream",
    "ForbiddenError",
    "Identity",
    "NotFoundError",
    "RangeRead",
    "RateLimited",
    "Read",
    "ReadSet",
    "ReadSetExpired",
    "Retrying",
    "Shard",
    "ShardInfo",
    "ShardVersion",
    "Space",
    "SpaceInfo",
    "Transaction",
    "Unavailable",
    "UpstreamError",
    "Write",
    "WrittenKey",
    "error_from_openai",
    "error_from_response",
]
