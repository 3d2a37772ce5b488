"""Checkpoint devices: network output buffers and disk buffers."""
