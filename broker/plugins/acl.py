"""amqtt topic plugin: delegates to :func:`broker.acl.allowed` with the role the auth plugin stored.

:class:`broker.amqtt_overrides.AmqttBroker` calls :func:`broker.acl.allowed` directly when this is the only topic
plugin (skipping amqtt's task-per-plugin dispatch); this class keeps the same rules usable in a plain amqtt Broker.
"""

from __future__ import annotations

from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from broker import acl
from broker.plugins import ROLE_KEY


def session_allowed(session: Session | None, topic: str | None, action: Action | str | None) -> bool:
    if session is None or topic is None or action is None:
        return False
    role = session.attributes.get(ROLE_KEY)
    if role is None:
        return False
    return acl.allowed(role, session.username or "", topic, str(action))


class ClawTopicPlugin(BaseTopicPlugin):
    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        return session_allowed(session, topic, action)
