"""What runs inside a simulated domain: the guest's service and its view of the machine.

The bottom layer: it imports nothing of the orchestrator's (no hypervisors/,
devices/, transport/, protection/ or service/), as a guest kernel knows
nothing of the toolstack that protects it. ``machine`` is the simulated
machine as the guest sees it (its memory, log-dirty map, state word, disk);
the simulated hypervisor builds its domains on the same layout.
"""
