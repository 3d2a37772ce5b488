#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: remus orchestrator developers
# GNU General Public License v2.0 only (see https://spdx.org/licenses/GPL-2.0-only.html)
# SPDX-License-Identifier: GPL-2.0-only

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: host_info
short_description: What remusd knows of its host, and the host's protections
version_added: 0.1.0
description:
  - Reads remusd's C(GET /v1/health), C(GET /v1/host) and C(GET /v1/protections) - the
    backend (C(xen), or C(sim) for the simulated hypervisor), the Xen version, the save
    helper, libvirt, which kinds of network buffering the host allows, the replication
    endpoint and every protection on the host.
  - Changes nothing.
author:
  - remus orchestrator developers (!UNKNOWN)
extends_documentation_fragment:
  - xenha.remus.remusd
options: {}
attributes:
  check_mode:
    description: Runs in check mode as it does otherwise; it changes nothing either way.
    support: full
  diff_mode:
    description: Nothing changes, so there is no diff.
    support: none
  platform:
    support: full
    description: Runs on the host whose remusd it talks to (or anywhere with I(url)).
    platforms: posix
seealso:
  - module: xenha.remus.protection
  - module: xenha.remus.preflight
"""

EXAMPLES = r"""
- name: What this host offers
  xenha.remus.host_info:
  register: remus_host

- name: Only on real Xen with a save helper
  ansible.builtin.assert:
    that:
      - remus_host.backend == 'xen'
      - remus_host.helper.path is not none
    fail_msg: "{{ remus_host.helper.error }}"

- name: Names of the domains this host replicates as primary
  ansible.builtin.debug:
    msg: "{{ remus_host.protections | selectattr('role', 'eq', 'primary') | map(attribute='name') }}"
"""

RETURN = r"""
remusd:
  description: remusd itself.
  returned: always
  type: dict
  contains:
    version:
      description: remusd's version.
      type: str
      sample: 0.1.0
    uptime_s:
      description: Seconds since remusd started.
      type: float
      sample: 3600.5
  sample: {"version": "0.1.0", "uptime_s": 3600.5}
backend:
  description: The hypervisor backend, C(xen), or C(sim) (the simulated hypervisor).
  returned: always
  type: str
  sample: xen
sim_host:
  description: The simulated host's directory; null on Xen.
  returned: always
  type: str
  sample: null
xen_version:
  description: The running hypervisor's version; null when not on Xen.
  returned: always
  type: str
  sample: "4.17"
helper:
  description: The save helper remusd runs (libxl-save-helper on Xen).
  returned: always
  type: dict
  contains:
    path:
      description: Its path; null when none was found.
      type: str
      sample: /usr/lib/xen-4.17/bin/libxl-save-helper
    version:
      description: The Xen release it comes with (C(simulated) for the simulation's).
      type: str
      sample: "4.17"
    error:
      description: Why none was found; null when one was.
      type: str
      sample: null
  sample: {"path": "/usr/lib/xen-4.17/bin/libxl-save-helper", "version": "4.17", "error": null}
libvirt:
  description: Whether libvirt's Python binding is there, its version, whether libvirtd runs.
  returned: always
  type: dict
  sample: {"available": true, "library_version": 9000000, "libvirtd_running": true, "uri": "xen:///system"}
netbuf:
  description:
    - For each kind of network buffering (C(plug), C(nfqueue), C(proxy)), C(available),
      or why the host does not allow it.
  returned: always
  type: dict
  sample: {"plug": "available", "nfqueue": "available", "proxy": "available"}
replication:
  description: The replication endpoint peers' primaries connect to.
  returned: always
  type: dict
  contains:
    listen:
      description: remusd's C([replication] listen).
      type: str
      sample: 0.0.0.0:8002
    port:
      description: The port it listens on.
      type: int
      sample: 8002
    protocol_version:
      description: The replication protocol's version.
      type: int
      sample: 1
  sample: {"listen": "0.0.0.0:8002", "port": 8002, "protocol_version": 1}
protections:
  description:
    - Every protection on the host, primary or secondary, as remusd reports them
      (see the I(protection) return value of M(xenha.remus.protection)).
  returned: always
  type: list
  elements: dict
  sample: [{"name": "vm1", "role": "primary", "peer": "10.77.0.12:8002", "state": "replicating"}]
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.xenha.remus.plugins.module_utils.remusd import (
    CONNECTION_MUTUALLY_EXCLUSIVE,
    RemusdError,
    client_from_module,
    connection_argument_spec,
)

HOST_KEYS = ("backend", "sim_host", "xen_version", "helper", "libvirt", "netbuf", "replication")


def main():
    module = AnsibleModule(
        argument_spec=connection_argument_spec(),
        supports_check_mode=True,
        mutually_exclusive=CONNECTION_MUTUALLY_EXCLUSIVE,
    )
    client = client_from_module(module)
    try:
        health = client.health() or {}
        host = client.host() or {}
        protections = client.protections() or []
    except RemusdError as exc:
        module.fail_json(msg=str(exc))
    result = dict(
        changed=False,
        remusd=dict(version=health.get("version"), uptime_s=health.get("uptime_s")),
        protections=protections,
    )
    for key in HOST_KEYS:
        result[key] = host.get(key)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
