"""switchboard_client: the asyncio Python client of the Switchboard real-time server.

``Client`` (client.py) keeps one WebSocket open and reconnects for ever; ``Subscription``
(subscription.py) iterates a channel's publications with recovery; the values it hands
over are in models.py, the exceptions in errors.py, the reconnect pacing in backoff.py, the handlers'
task in events.py, the wire helpers in wire.py.
"""

from .backoff import parse_retry_hint
from .client import Client
from .errors import RecoveryFailed, SwitchboardError
from .events import Handler
from .models import Frame, History, Member, Message, Position, Presence, Publication, State, StateChange
from .subscription import Subscription

__all__ = [
    "Client",
    "Frame",
    "Handler",
    "History",
    "Member",
    "Message",
    "Position",
    "Presence",
    "Publication",
    "RecoveryFailed",
    "State",
    "StateChange",
    "Subscription",
    "SwitchboardError",
    "parse_retry_hint",
]
