"""Hypervisor backends behind one small interface (base.py): sim and xen."""
