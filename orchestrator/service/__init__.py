"""remusd: the service that owns protections (HTTP API, registry, metrics, events)."""
