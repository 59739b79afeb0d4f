"""amqtt plugins for the embedded broker: authentication (``auth.ClawAuthPlugin``) and topic ACL
(``acl.ClawTopicPlugin``). Both hand off to pure code (:mod:`broker.creds`, :mod:`broker.acl`)."""

ROLE_KEY = "claw.role"  # session.attributes key holding the authenticated role ("edge", "node", "device")
REFUSE_KEY = "claw.refuse"  # session.attributes key: CONNACK return code for a refused CONNECT (default 5)
