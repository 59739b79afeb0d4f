"""The core layer: settings, LMDB, the MQTT client, the event-loop runtime, metrics, PKI and permissions.

Everything above it (broker/, edge/, node/, bench/, claw/) may import it; it imports only wire/ and
third-party packages.
"""
