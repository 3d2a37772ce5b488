"""High-availability orchestrator for Xen domains (Remus / COLO)."""
