#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: remus orchestrator developers
# GNU General Public License v2.0 only (see https://spdx.org/licenses/GPL-2.0-only.html)
# SPDX-License-Identifier: GPL-2.0-only

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: protection
short_description: Protect, pause, fail over and unprotect a Xen domain with remusd
version_added: 0.1.0
description:
  - Drives one protection of remusd (Remus or COLO high availability for a Xen domain)
    through remusd's HTTP API, on the host whose remusd is reached
    (I(socket), or I(url) with a token).
  - C(present) and C(paused) and C(absent) run against the primary's remusd (the host
    that runs the domain); C(failed_over) runs against the secondary's remusd.
  - Idempotent; supports check mode and diff mode (the protection's state and settings
    before and after).
  - Waits until the protection is in the state asked for (I(wait), I(timeout)) and
    returns its status as remusd reports it.
  - remusd's API cannot change the settings of a protection in place. A task whose
    settings differ from an existing protection's fails and names them, unless
    I(recreate=true), which unprotects the domain and protects it again with the new
    settings (a full resynchronisation; the domain runs on here meanwhile, unprotected).
author:
  - remus orchestrator developers (!UNKNOWN)
extends_documentation_fragment:
  - xenha.remus.remusd
  - xenha.remus.remusd.settings
options:
  name:
    description:
      - The domain (as Xen names it) and so the protection's name.
    type: str
    required: true
  state:
    description:
      - C(present), the domain is protected and replicating to I(peer) (a paused
        protection is resumed, which resynchronises it in full).
      - C(paused), replication is stopped and the protection kept, to be resumed with
        C(present). Only an existing protection can be paused.
      - C(absent), the domain is not protected (it runs on here); the secondary drops
        its copy.
      - C(failed_over), run against the B(secondary's) remusd, the secondary takes over
        from its last complete checkpoint and runs the domain. Under a witness it takes
        over only holding the protection's lease, which a primary that runs on still
        holds; see I(force).
    type: str
    choices: [present, absent, paused, failed_over]
    default: present
  recreate:
    description:
      - When an existing protection has settings other than the task's, unprotect and
        protect it again with the task's (a full resynchronisation). Without it such a
        task fails, naming the settings that differ.
    type: bool
    default: false
  force:
    description:
      - With I(state=failed_over), take over even though the primary was heard from
        within the last moment (remusd answers C(PRIMARY_ALIVE) otherwise). Two copies
        can run if the primary is in fact alive and no witness stops it.
    type: bool
    default: false
  wait:
    description:
      - Wait until the protection is in the state asked for (C(replicating) for
        C(present), C(paused), C(failed-over), gone for C(absent)).
    type: bool
    default: true
  timeout:
    description:
      - Seconds to wait for the state with I(wait).
    type: int
    default: 120
attributes:
  check_mode:
    description: Reports what would change (I(actions), and the diff) and changes nothing.
    support: full
  diff_mode:
    description: The protection's state and settings before and after.
    support: full
  platform:
    support: full
    description: Runs on the host whose remusd it talks to (or anywhere with I(url)).
    platforms: posix
seealso:
  - module: xenha.remus.preflight
  - module: xenha.remus.host_info
notes:
  - In check mode the settings a new protection would take from remusd's configuration
    (those the task leaves out) are not shown in the diff.
  - A protection is refused with the pre-flight's typed reasons (I(reasons)); see
    M(xenha.remus.preflight) to ask for them without protecting.
  - Right after a protection of the same domain ended, the peer may still be dropping its
    copy; a protect refused only for that (C(peer_name)) is retried within I(timeout).
"""

EXAMPLES = r"""
- name: Protect vm1 to the other host, checkpointing every 100 ms
  xenha.remus.protection:
    name: vm1
    peer: 10.77.0.12:8002
    interval_ms: 100
    heartbeat_timeout_ms: 1000

- name: Protect vm2 under an etcd witness
  xenha.remus.protection:
    name: vm2
    peer: 10.77.0.12:8002
    witness: etcd3+http://10.77.0.1:2379
    lease_ttl_ms: 3000

- name: COLO without output comparison (unsafe)
  xenha.remus.protection:
    name: vm3
    peer: 10.77.0.12:8002
    mode: colo
    no_netbuf: true
    unsafe: true

- name: Pause replication of vm1 (the protection is kept)
  xenha.remus.protection:
    name: vm1
    state: paused

- name: On the secondary, take vm1 over now (its primary's host is gone)
  xenha.remus.protection:
    name: vm1
    state: failed_over
    force: true
  delegate_to: xen-b

- name: Unprotect vm1 through remusd's HTTPS listener
  xenha.remus.protection:
    name: vm1
    state: absent
    url: https://xen-a.example.org:8443
    token_file: /etc/remus/api-token
    ca_path: /etc/remus/ca.pem
"""

RETURN = r"""
actions:
  description:
    - The requests made to remusd, in order (in check mode, the ones that would be
      made), each one of C(protect), C(resume), C(pause), C(unprotect), C(failover).
  returned: always
  type: list
  elements: str
  sample: [protect]
protection:
  description:
    - The protection as remusd reports it (C(GET /v1/protections/{name})) once the state
      was reached (in check mode, as it was); null when there is none.
  returned: always
  type: dict
  contains:
    name:
      description: The domain.
      type: str
      sample: vm1
    role:
      description: C(primary) or C(secondary), on this host.
      type: str
      sample: primary
    peer:
      description: The other host's replication endpoint (or the primary, on a secondary).
      type: str
      sample: 10.77.0.12:8002
    mode:
      description: C(remus) or C(colo).
      type: str
      sample: remus
    desired:
      description: What the protection was asked to be, C(protected), C(paused), C(unprotected).
      type: str
      sample: protected
    state:
      description:
        - starting, replicating, failing-over, failed-over, stopped, error, paused; under
          a lease also fenced, unprotected and taken-over. I(reason) says why.
      type: str
      sample: replicating
    reason:
      description: Why the protection is in its state (empty when there is nothing to say).
      type: str
      sample: ""
    checkpoints:
      description: Checkpoints the secondary has acknowledged (or loaded, on a secondary).
      type: int
      sample: 42
    settings:
      description: The protection's settings, the body that would protect it the same way
        again (empty on a secondary).
      type: dict
      sample: {"name": "vm1", "peer": "10.77.0.12:8002", "mode": "remus", "interval_ms": 100}
    witness:
      description: The witness and the lease as this host holds it; null without a witness.
      type: dict
      sample: {"url": "file:///var/lib/remus/witness", "lease": "held", "holder": "worker"}
    disk:
      description: C(replicated) or C(not replicated); null on a secondary.
      type: str
      sample: replicated
    colo:
      description: COLO's figures; null for Remus.
      type: dict
    live:
      description: The worker's status as it is.
      type: dict
  sample:
    name: vm1
    role: primary
    peer: 10.77.0.12:8002
    mode: remus
    desired: protected
    state: replicating
    reason: ""
    checkpoints: 42
code:
  description: remusd's error code when it refused a request (C(NOT_PROTECTABLE), C(WRONG_ROLE), ...).
  returned: failure, when remusd answered with an error
  type: str
  sample: NOT_PROTECTABLE
reasons:
  description: The pre-flight checks a refused protect failed, each with C(check) and C(message).
  returned: failure, when remusd refused to protect
  type: list
  elements: dict
  sample: [{"check": "peer_reachable", "message": "peer 10.77.0.12:8002: Connection refused"}]
"""

import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.xenha.remus.plugins.module_utils.protection_state import (
    STATES,
    PlanError,
    plan,
    reached,
    settings_argument_spec,
    unsafe_problem,
    view,
    wanted_settings,
    wanted_view,
)
from ansible_collections.xenha.remus.plugins.module_utils.remusd import (
    CONNECTION_MUTUALLY_EXCLUSIVE,
    RemusdApiError,
    RemusdError,
    client_from_module,
    connection_argument_spec,
)

PEER_STILL_DROPPING = "peer_name"


def _protect(client, name, wanted, timeout):
    """POST, retried while the peer still drops an old copy of the domain."""
    deadline = time.monotonic() + min(timeout, 30)
    while True:
        try:
            return client.protect(dict(wanted, name=name))
        except RemusdApiError as exc:
            checks = set(r.get("check") for r in exc.reasons())
            if checks != set([PEER_STILL_DROPPING]) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _run(client, action, name, wanted, params):
    if action == "protect":
        return _protect(client, name, wanted, params["timeout"])
    if action == "resume":
        return client.resume(name)
    if action == "pause":
        return client.pause(name)
    if action == "unprotect":
        return client.unprotect(name)
    if action == "failover":
        return client.failover(name, params["force"])
    raise AssertionError(action)


def main():
    argument_spec = dict(
        name=dict(type="str", required=True),
        state=dict(type="str", default="present", choices=list(STATES)),
        recreate=dict(type="bool", default=False),
        force=dict(type="bool", default=False),
        wait=dict(type="bool", default=True),
        timeout=dict(type="int", default=120),
    )
    argument_spec.update(settings_argument_spec())
    argument_spec.update(connection_argument_spec())
    module = AnsibleModule(
        argument_spec=argument_spec,
        supports_check_mode=True,
        mutually_exclusive=CONNECTION_MUTUALLY_EXCLUSIVE,
    )
    p = module.params
    name, state = p["name"], p["state"]
    wanted = wanted_settings(p)
    if state in ("present", "paused"):
        problem = unsafe_problem(wanted)
        if problem:
            module.fail_json(msg=problem, actions=[], protection=None)
    client = client_from_module(module)
    result = dict(changed=False, actions=[], protection=None)
    action = "read"
    done_actions = []
    try:
        before = client.protection(name)
        result["protection"] = before
        try:
            actions = plan(state, name, before, wanted, p["recreate"])
        except PlanError as exc:
            module.fail_json(msg=str(exc), **result)
        result.update(changed=bool(actions), actions=actions)
        if module.check_mode:
            if module._diff:
                after = wanted_view(state, name, before, wanted) if actions else view(before)
                result["diff"] = dict(before=view(before), after=after)
            module.exit_json(**result)
        for action in actions:
            _run(client, action, name, wanted, p)
            done_actions.append(action)
        action = "read"
        doc = client.protection(name)
        if p["wait"]:
            done, failure = reached(state, doc)
            if not done and not failure:
                doc = client.wait_for(
                    name, lambda d: any(reached(state, d)), max(0, p["timeout"])
                )[1]
                done, failure = reached(state, doc)
            result["protection"] = doc
            if failure or not done:
                where = (doc or {}).get("state", "gone")
                why = failure or "it is %s after %d s" % (where, p["timeout"])
                if doc and doc.get("reason") and not failure:
                    why += " (%s)" % doc["reason"]
                module.fail_json(msg="%s did not reach %s: %s" % (name, state, why), **result)
        result["protection"] = doc
        if module._diff:
            result["diff"] = dict(before=view(before), after=view(doc))
    except RemusdApiError as exc:
        # changed only by the requests remusd carried out before the one it refused
        failed = dict(result, code=exc.code, status=exc.status, details=exc.details)
        if action != "read":
            failed["changed"] = bool(done_actions)
        if exc.reasons():
            failed["reasons"] = exc.reasons()
        verb = "fail over" if action == "failover" else action
        module.fail_json(msg="remusd refused to %s %s: %s" % (verb, name, exc), **failed)
    except RemusdError as exc:
        result["changed"] = bool(done_actions)
        module.fail_json(msg=str(exc), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
