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
short_description: Protect, pause, fail over, switch over and unprotect a Xen domain with remusd
version_added: 0.1.0
description:
  - Drives one protection of remusd (Remus or COLO high availability for a Xen domain)
    through remusd's HTTP API, on the host whose remusd is reached
    (I(socket), or I(url) with a token).
  - C(present), C(paused), C(absent) and C(switched_over) run against the primary's
    remusd (the host that runs the domain); C(failed_over) runs against the secondary's
    remusd.
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
        protection is resumed, which resynchronises it in full). Run against the
        remusd of a secondary that took the domain over (C(failed-over)), it protects
        the domain back to I(peer), the old primary, from a full first copy, once that
        host has dropped its stale copy.
      - C(paused), replication is stopped and the protection kept, to be resumed with
        C(present). Only an existing protection can be paused.
      - C(absent), the domain is not protected (it runs on here); the secondary drops
        its copy.
      - C(failed_over), run against the B(secondary's) remusd, the secondary takes over
        from its last complete checkpoint and runs the domain. Under a witness it takes
        over only holding the protection's lease, which a primary that runs on still
        holds; see I(force).
      - C(switched_over), run against the remusd of the host that is the B(primary)
        before the switchover, a planned swap of roles; the domain must be replicating
        (and its lease held, under a witness). The primary takes a last checkpoint with
        the domain paused, the peer runs the domain from it and protects it back to
        this host, which becomes its secondary. A host that is the secondary of the
        protection already is left as it is (the switchover was done), so the task's
        second run changes nothing; to switch back, run the task against the other
        host's remusd. A primary that cannot switch over fails with remusd's code
        (C(LINK_UNHEALTHY), C(WITNESS_UNHEALTHY), C(SWITCHOVER_FAILED)); the settings
        options are not used.
    type: str
    choices: [present, absent, paused, failed_over, switched_over]
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
        C(present), C(paused), C(failed-over), gone for C(absent), and for
        C(switched_over) this host the secondary, the peer having protected the domain
        back to it).
      - Without it, C(switched_over) still returns only once the switchover is done
        (remusd answers its request then), before the peer protects the domain back.
    type: bool
    default: true
  timeout:
    description:
      - Seconds to wait for the state with I(wait).
      - With I(state=switched_over), also the seconds the switchover's request may take
        when that is longer than I(request_timeout) (remusd answers it once done, which
        can take the takeover window of the lease and more).
    type: int
    default: 120
attributes:
  check_mode:
    description:
      - Reports what would change (I(actions), and the diff) and changes nothing.
      - With I(state=switched_over), a primary that is not replicating, or whose lease is
        not held, fails as remusd would refuse it (its code); remusd's other checks (the
        age of the last checkpoint) are made only by the switchover itself.
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

- name: Planned maintenance of xen-a, switch vm1 over to xen-b (run on xen-a, its primary)
  xenha.remus.protection:
    name: vm1
    state: switched_over
    timeout: 180
  delegate_to: xen-a
  register: switched

- name: Say how long vm1 was paused
  ansible.builtin.debug:
    msg: "vm1 runs on xen-b, paused {{ switched.switchover_pause_ms }} ms"

- name: Maintenance done, switch vm1 back to xen-a (run on xen-b, its primary now)
  xenha.remus.protection:
    name: vm1
    state: switched_over
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
      made), each one of C(protect), C(resume), C(pause), C(unprotect), C(failover),
      C(switchover).
  returned: always
  type: list
  elements: str
  sample: [protect]
protection:
  description:
    - The protection as remusd reports it (C(GET /v1/protections/{name})) once the state
      was reached (in check mode, as it was); null when there is none.
    - With I(state=switched_over) and I(wait), this host's record as the peer's secondary;
      without I(wait), remusd's answer to the switchover (its state C(switched-over)).
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
          a lease also fenced, unprotected and taken-over; switched-over on the old primary
          after a switchover, until it is the peer's secondary. I(reason) says why.
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
switchover_pause_ms:
  description:
    - How long the domain was paused by the switchover this task made, in milliseconds
      (remusd's C(live.switchover_pause_ms)).
    - Null when the task made none (check mode, or this host was switched over already).
  returned: with I(state=switched_over)
  type: float
  sample: 41.7
code:
  description:
    - remusd's error code when it refused a request (C(NOT_PROTECTABLE), C(WRONG_ROLE),
      C(LINK_UNHEALTHY), C(WITNESS_UNHEALTHY), C(SWITCHOVER_FAILED), ...).
    - In check mode, the code remusd would refuse a switchover with.
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
    switchover_refusal,
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
    if action == "switchover":
        # answered once done: it may take longer than another request
        return client.switchover(name, max(params["request_timeout"] or 0, params["timeout"]))
    raise AssertionError(action)


def _not_reached(state, doc, timeout):
    """Why the wait for ``state`` ran out (nothing said it never would)."""
    where = (doc or {}).get("state", "gone")
    if state == "switched_over":
        why = (
            "its peer runs it, but has not protected it back to this host within %d s "
            "(it is %s here)" % (timeout, where)
        )
    else:
        why = "it is %s after %d s" % (where, timeout)
    if doc and doc.get("reason"):
        why += " (%s)" % doc["reason"]
    return why


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
    if state == "switched_over":
        result["switchover_pause_ms"] = None
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
            refusal = switchover_refusal(before) if "switchover" in actions else None
            if refusal:
                result.update(changed=False, code=refusal[0])
                module.fail_json(
                    msg="remusd would refuse to switch over %s: %s" % (name, refusal[1]),
                    **result
                )
            if module._diff:
                after = wanted_view(state, name, before, wanted) if actions else view(before)
                result["diff"] = dict(before=view(before), after=after)
            module.exit_json(**result)
        switched = None
        for action in actions:
            answer = _run(client, action, name, wanted, p)
            done_actions.append(action)
            if action == "switchover":
                switched = answer or {}
                live = switched.get("live") or {}
                result["switchover_pause_ms"] = live.get("switchover_pause_ms")
        action = "read"
        # without wait, a switchover's own answer (this host's record follows it)
        doc = switched if switched and not p["wait"] else client.protection(name)
        if p["wait"]:
            done, failure = reached(state, doc)
            if not done and not failure:
                doc = client.wait_for(
                    name, lambda d: any(reached(state, d)), max(0, p["timeout"])
                )[1]
                done, failure = reached(state, doc)
            result["protection"] = doc
            if failure or not done:
                why = failure or _not_reached(state, doc, p["timeout"])
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
        verb = {"failover": "fail over", "switchover": "switch over"}.get(action, action)
        module.fail_json(msg="remusd refused to %s %s: %s" % (verb, name, exc), **failed)
    except RemusdError as exc:
        result["changed"] = bool(done_actions)
        module.fail_json(msg=str(exc), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
