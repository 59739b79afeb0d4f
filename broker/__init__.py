"""SmartClaw's embedded MQTT broker (amqtt) and its security pieces.

- :mod:`broker.app` — ``run_broker(settings)``, ``BrokerHandle``; :mod:`broker.clawbroker` — ``ClawBroker``
- :mod:`broker.amqtt_overrides` — every override of amqtt's private API (amqtt's traps fixed)
- :mod:`broker.creds` — ``CredentialStore``: node/device credentials in LMDB (``claw cred …``)
- :mod:`broker.acl` — ``allowed()`` / ``will_allowed()``: the topic rules, pure functions
- :mod:`broker.plugins` — the amqtt auth and topic plugins that use the two above

Nothing is imported here, so ``broker.creds``/``broker.acl`` stay cheap to import without amqtt.
"""
