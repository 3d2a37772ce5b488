#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: remus orchestrator developers
# GNU General Public License v2.0 only (see https://spdx.org/licenses/GPL-2.0-only.html)
# SPDX-License-Identifier: GPL-2.0-only

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: preflight
short_description: Whether remusd could protect a domain as asked, with the typed reasons why not
version_added: 0.1.0
description:
  - Runs remusd's pre-flight for a protection of I(name) to I(peer) with the settings
    given, on the primary's remusd, and returns whether it could be protected and every
    failed check, each a typed reason (C(check), C(message)), as remusd's own refusal
    names them - C(domain_exists), C(domain_running), C(unsafe), C(helper), C(netbuf),
    C(colo), C(colo_compare), C(peer_address), C(peer_reachable), C(peer_version),
    C(peer_memory), C(peer_name), C(settings) (a setting out of its bounds), and
    C(already_protected).
  - It never changes anything, and never fails because the domain cannot be
    protected; it fails only when remusd cannot be asked.
  - It asks remusd's C(POST /v1/preflight), which runs the checks C(POST
    /v1/protections) runs, in the same order, and registers and starts nothing.
author:
  - remus orchestrator developers (!UNKNOWN)
extends_documentation_fragment:
  - xenha.remus.remusd
  - xenha.remus.remusd.settings
options:
  name:
    description:
      - The domain to check.
    type: str
    required: true
  peer:
    description:
      - C(HOST:PORT) of the secondary's remusd replication endpoint, which the pre-flight
        asks for room, its version and the names it runs.
    type: str
    required: true
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
"""

EXAMPLES = r"""
- name: Can vm1 be protected to the other host?
  xenha.remus.preflight:
    name: vm1
    peer: 10.77.0.12:8002
  register: check

- name: Say why not
  ansible.builtin.fail:
    msg: "{{ check.reasons | map(attribute='message') | join('; ') }}"
  when: not check.protectable

- name: Protect only the domains that can be
  xenha.remus.protection:
    name: vm1
    peer: 10.77.0.12:8002
  when: check.protectable
"""

RETURN = r"""
protectable:
  description: Whether remusd would protect the domain as asked.
  returned: always
  type: bool
  sample: false
reasons:
  description: Every failed check; empty when I(protectable).
  returned: always
  type: list
  elements: dict
  contains:
    check:
      description: The check, a stable name to switch on.
      type: str
      sample: domain_exists
    message:
      description: What failed, for people.
      type: str
      sample: "no domain named vm1"
  sample: [{"check": "peer_reachable", "message": "peer 10.77.0.12:8002: Connection refused"}]
code:
  description:
    - The error code remusd would answer a protect with (C(DOMAIN_NOT_FOUND),
      C(PEER_UNREACHABLE), C(NOT_PROTECTABLE), C(ALREADY_PROTECTED), C(BAD_REQUEST));
      null when I(protectable).
  returned: always
  type: str
  sample: DOMAIN_NOT_FOUND
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.xenha.remus.plugins.module_utils.protection_state import (
    SETTINGS_CHECK,
    settings_argument_spec,
    wanted_settings,
)
from ansible_collections.xenha.remus.plugins.module_utils.remusd import (
    CONNECTION_MUTUALLY_EXCLUSIVE,
    RemusdApiError,
    RemusdError,
    client_from_module,
    connection_argument_spec,
)


def main():
    argument_spec = dict(name=dict(type="str", required=True))
    argument_spec.update(settings_argument_spec())
    argument_spec["peer"] = dict(type="str", required=True)
    argument_spec.update(connection_argument_spec())
    module = AnsibleModule(
        argument_spec=argument_spec,
        supports_check_mode=True,
        mutually_exclusive=CONNECTION_MUTUALLY_EXCLUSIVE,
    )
    name = module.params["name"]
    wanted = wanted_settings(module.params)
    client = client_from_module(module)
    result = dict(changed=False, protectable=False, reasons=[], code=None)
    try:
        try:
            answer = client.preflight(dict(wanted, name=name))
        except RemusdApiError as exc:
            if exc.code != "BAD_REQUEST":
                raise
            # a body remusd's schema refuses (a type, a bound): one settings reason
            result.update(reasons=[dict(check=SETTINGS_CHECK, message=exc.message)], code=exc.code)
            module.exit_json(**result)
        result.update(
            protectable=bool(answer.get("protectable")),
            reasons=list(answer.get("reasons") or []),
            code=answer.get("code"),
        )
        module.exit_json(**result)
    except RemusdError as exc:
        module.fail_json(msg=str(exc), **result)


if __name__ == "__main__":
    main()
