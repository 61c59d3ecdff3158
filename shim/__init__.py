"""The OmniNode shim: the daemon on every device (stage host, planner, coordinator)."""
