"""Checkpoint devices: one interface, the hooks libxl's checkpoint devices have.

The Remus primary calls them around each checkpoint (``libxl_remus.c``):
``postsuspend`` once the guest is suspended (a new output epoch starts),
``preresume`` before it resumes, and ``commit`` once the secondary has
acknowledged the checkpoint of an epoch (we commit on the ACK; xl commits as
soon as CHECKPOINT_END is written).
"""

from __future__ import annotations

import abc


class CheckpointDevice(abc.ABC):
    name: str = "device"
    # what the primary's HELLO announces when the device has a secondary half
    # (the disk: "disk"); None for devices that are the primary's alone
    capability: str | None = None

    def digest(self, epoch: int) -> bytes | None:
        """What the secondary's ACK of checkpoint ``epoch`` must cover for this device
        (the disk: a digest of the blocks sent), or None if nothing."""
        return None

    @abc.abstractmethod
    async def setup(self) -> None:
        """Before the first checkpoint."""

    @abc.abstractmethod
    async def postsuspend(self, epoch: int) -> None:
        """The guest is suspended; output from now on belongs to ``epoch``."""

    @abc.abstractmethod
    async def preresume(self) -> None:
        """The guest is about to resume."""

    @abc.abstractmethod
    async def commit(self, epoch: int) -> None:
        """Checkpoint ``epoch`` is safe on the secondary: release what it covers."""

    @abc.abstractmethod
    async def teardown(self, release: bool) -> None:
        """Replication ends; ``release`` lets held output go (the guest runs on here)."""
