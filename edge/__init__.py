"""SmartClaw."""
