# -*- coding: utf-8 -*-
# Copyright: remus orchestrator developers
# GNU General Public License v2.0 only (see https://spdx.org/licenses/GPL-2.0-only.html)
# SPDX-License-Identifier: GPL-2.0-only
"""What the protection module decides, apart from any I/O: the settings it can set,
which state a protection document is in, what to ask remusd to reach a wanted state,
and when that state is reached.

Nothing here imports Ansible or talks to remusd, so it is tested on its own.

A protection's document is remusd's ``GET /v1/protections/{name}``: ``role`` (primary
or secondary), ``desired`` (protected, paused, unprotected), ``state`` (starting,
replicating, failing-over, failed-over, stopped, error, paused, fenced, unprotected,
taken-over, switched-over), ``reason``, ``peer`` and ``settings`` (the body that would
protect it the same way again; empty on a secondary).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

# Every setting remusd's POST /v1/protections takes besides the name (the API's
# schema, derived from orchestrator/protection/spec.py FIELDS where api is true), with
# its argument_spec type. None of them has a default here: what is not given is
# remusd's own (its [replication] and [witness] configuration, or the spec's).
SETTINGS = (
    ("peer", "str"),
    ("ssh", "str"),
    ("ssh_known_hosts", "str"),
    ("ssh_identity", "str"),
    ("mode", "str"),
    ("interval_ms", "int"),
    ("heartbeat_interval_ms", "int"),
    ("heartbeat_timeout_ms", "int"),
    ("ack_timeout_ms", "int"),
    ("netbuf", "str"),
    ("no_netbuf", "bool"),
    ("no_disk", "bool"),
    ("unsafe", "bool"),
    ("checkpoint_max_interval_ms", "int"),
    ("compare_timeout_ms", "float"),
    ("witness", "str"),
    ("lease_ttl_ms", "int"),
    ("insecure_link", "bool"),
)
SETTING_NAMES = tuple(setting[0] for setting in SETTINGS)
MODES = ("remus", "colo")
NETBUFS = ("auto", "plug", "nfqueue", "proxy")
NO_WITNESS = "none"

STATES = ("present", "absent", "paused", "failed_over", "switched_over")

# a secondary's states after which it replicates no more (its worker has exited)
SECONDARY_ENDED = ("stopped", "error")
# a secondary's states once it takes the domain over (a failover to this host)
SECONDARY_TAKING_OVER = ("failing-over", "failed-over")
# an old primary's state once its switchover handed the domain to the peer (its record
# stays a primary's until the peer protects the domain back, then it is a secondary's)
SWITCHED_OVER = "switched-over"
# the lease states remusd hands over in a switchover (held, or a renewal failed but the
# lease is still valid)
LEASE_HANDED_OVER = ("held", "uncertain")


class PlanError(Exception):
    """The wanted state cannot be reached from this one; the message says why and what to do."""


def settings_argument_spec():
    """The settings as module options (all optional, no defaults: remusd's apply)."""
    spec = {}
    for name, kind in SETTINGS:
        spec[name] = dict(type=kind)
    spec["mode"]["choices"] = list(MODES)
    spec["netbuf"]["choices"] = list(NETBUFS)
    return spec


def wanted_settings(params):
    """The settings a task gave (None: not given), as the API's body takes them."""
    return dict((k, params[k]) for k in SETTING_NAMES if params.get(k) is not None)


def unsafe_switches(wanted):
    """The unsafe switches a task asked for."""
    on = [k for k in ("no_netbuf", "no_disk") if wanted.get(k)]
    if wanted.get("witness") == NO_WITNESS:
        on.append("witness: none")
    return on


def unsafe_problem(wanted):
    """Why the task's settings are refused before remusd is asked, or None."""
    on = unsafe_switches(wanted)
    if on and wanted.get("unsafe") is not True:
        return (
            "%s %s unsafe (output released unbuffered, the disk not replicated, or no "
            "witness to stop two copies running): set unsafe: true to ask for %s"
            % (", ".join(on), "is" if len(on) == 1 else "are", "it" if len(on) == 1 else "them")
        )
    return None


def current_state(doc):
    """The module's name for where a protection stands on this host.

    absent: none here; present: a primary asked to replicate; paused: a primary whose
    replication is paused; unprotected: a primary whose protection ended on its own
    (another host took it over, say); failed_over: a secondary that took over;
    secondary: a secondary still receiving (or that stopped).
    """
    if doc is None:
        return "absent"
    if doc.get("role") == "secondary":
        return "failed_over" if doc.get("state") == "failed-over" else "secondary"
    desired = doc.get("desired")
    if desired == "protected":
        return "present"
    if desired == "paused":
        return "paused"
    return "unprotected"


def setting_changes(wanted, settings):
    """{setting: (what remusd has, what the task wants)} for every given setting that
    differs from the protection's."""
    changes = {}
    for key in SETTING_NAMES:
        if key not in wanted:
            continue
        have = settings.get(key)
        want = wanted[key]
        if have != want or isinstance(have, bool) != isinstance(want, bool):
            changes[key] = (have, want)
    return changes


def _describe(doc):
    state = doc.get("state") or "?"
    reason = doc.get("reason")
    return "%s (%s)" % (state, reason) if reason else state


def _primary(doc):
    # a secondary's document may not know its primary's address
    return ", its primary %s" % doc["peer"] if doc.get("peer") else ""


def _changes_text(changes):
    return ", ".join("%s %r -> %r" % (k, have, want) for k, (have, want) in sorted(changes.items()))


def plan(state, name, doc, wanted, recreate=False):
    """The requests (in order) that take protection ``name`` from ``doc`` to ``state``:
    a list of protect, resume, pause, unprotect, failover, switchover. Raises
    :class:`PlanError` when remusd's API cannot get there from here."""
    here = current_state(doc)
    if state == "failed_over":
        return _plan_failover(name, doc, here)
    if state == "switched_over":
        return _plan_switchover(name, doc)
    if here == "failed_over" and state == "present":
        # the guest runs here since the failover: protect it back to the old host
        if not wanted.get("peer") and not wanted.get("ssh"):
            raise PlanError(
                "%s took the guest over here: give peer (the old primary) to protect it "
                "back" % name
            )
        return ["protect"]
    if here in ("secondary", "failed_over"):
        if state == "absent":
            raise PlanError(
                "%s is the secondary here%s: unprotect it on the primary's remusd, which "
                "ends this copy too" % (name, _primary(doc))
            )
        raise PlanError(
            "%s is the secondary here (%s)%s: state %s runs against the primary's remusd"
            % (name, _describe(doc), _primary(doc), state)
        )
    if state == "absent":
        return [] if here == "absent" else ["unprotect"]
    if here == "absent":
        if state == "paused":
            raise PlanError(
                "no protection of %s here to pause: protect it first (state: present)" % name
            )
        if not wanted.get("peer") and not wanted.get("ssh"):
            raise PlanError("peer is required to protect %s (or ssh)" % name)
        return ["protect"] if state == "present" else ["protect", "pause"]
    changes = setting_changes(wanted, doc.get("settings") or {})
    if here == "unprotected":
        if recreate:
            return ["unprotect", "protect"] + (["pause"] if state == "paused" else [])
        raise PlanError(
            "the protection of %s here has ended: %s. Remove it (state: absent) and protect "
            "it again, or set recreate: true" % (name, _describe(doc))
        )
    if changes:
        if not recreate:
            raise PlanError(
                "%s is protected with other settings (%s); remusd's API cannot change the "
                "settings of a protection in place: set recreate: true to unprotect and "
                "protect it again with these (a full resynchronisation), or leave them as "
                "they are" % (name, _changes_text(changes))
            )
        return ["unprotect", "protect"] + (["pause"] if state == "paused" else [])
    if state == "present":
        return ["resume"] if here == "paused" else []
    # paused
    return ["pause"] if here == "present" else []


def _plan_failover(name, doc, here):
    if here == "absent":
        raise PlanError(
            "no protection of %s on this host: state failed_over runs against the remusd "
            "of the secondary's host" % name
        )
    if doc.get("role") != "secondary":
        raise PlanError(
            "%s is the primary here (%s, replicating to %s): state failed_over runs against "
            "the secondary's remusd" % (name, _describe(doc), doc.get("peer"))
        )
    if here == "failed_over" or doc.get("state") == "failing-over":
        return []
    if doc.get("state") in SECONDARY_ENDED:
        raise PlanError(
            "the secondary of %s here is %s: there is no copy left to fail over to"
            % (name, _describe(doc))
        )
    return ["failover"]


def _plan_switchover(name, doc):
    """A switchover runs against the primary's remusd, and this host is the secondary
    once done: a secondary here has switched over already (the task's second run). A
    primary is asked whatever its state: remusd refuses one that cannot hand over
    (LINK_UNHEALTHY, WITNESS_UNHEALTHY) with its own code and message."""
    if doc is None:
        raise PlanError(
            "no protection of %s on this host: state switched_over runs against the remusd "
            "of the primary's host (the host that runs the domain)" % name
        )
    st = doc.get("state")
    if doc.get("role") == "secondary":
        if st in SECONDARY_TAKING_OVER:
            raise PlanError(
                "%s was failed over to this host (%s), which runs it now: state "
                "switched_over runs against the primary's remusd" % (name, _describe(doc))
            )
        return []
    if st == SWITCHED_OVER:
        return []  # handed over already; the peer protects it back to this host
    return ["switchover"]


def switchover_refusal(doc):
    """(code, message) remusd would refuse a switchover of the primary ``doc`` with, as
    far as its document tells (the replication's state, the lease), or None. Check
    mode's prediction only: otherwise remusd's own answer decides."""
    name = doc.get("name")
    if doc.get("state") != "replicating":
        return "LINK_UNHEALTHY", "%s is %s, not replicating" % (name, _describe(doc))
    witness = doc.get("witness")
    if isinstance(witness, dict) and witness.get("lease") not in LEASE_HANDED_OVER:
        return (
            "WITNESS_UNHEALTHY",
            "the lease of %s is %s: it cannot be handed over"
            % (name, witness.get("lease") or "not held"),
        )
    return None


def reached(state, doc):
    """(done, failure): whether ``doc`` is in ``state``, or why it never will be."""
    if state == "absent":
        return doc is None, None
    if doc is None:
        return False, "the protection is gone"
    st = doc.get("state")
    if state == "present":
        if doc.get("desired") == "unprotected" or st == "taken-over":
            return False, "its protection ended: %s" % _describe(doc)
        return st == "replicating", None
    if state == "paused":
        return doc.get("desired") == "paused" and st == "paused", None
    if state == "failed_over":
        if st in SECONDARY_ENDED:
            return False, "the secondary did not take over: %s" % _describe(doc)
        return st == "failed-over", None
    if state == "switched_over":
        if doc.get("role") != "secondary":
            if st == SWITCHED_OVER:
                return False, None  # the peer protects it back to this host
            return False, "it did not switch over: %s" % _describe(doc)
        if st in SECONDARY_ENDED or st in SECONDARY_TAKING_OVER:
            return False, "the protection back to this host is %s" % _describe(doc)
        return True, None
    raise ValueError("unknown state %r" % state)


def wanted_view(state, name, before, wanted):
    """What check mode predicts a protection's view to be once at ``state``."""
    if state == "absent":
        return {}
    if state == "failed_over":  # a secondary has no settings of its own to change
        return dict(view(before), state=state)
    if state == "switched_over":  # the peer's secondary, protected back to this host
        return {"state": "secondary", "role": "secondary", "settings": {}}
    settings = dict((before or {}).get("settings") or {})
    settings.update(wanted)
    settings["name"] = name
    return {"state": state, "role": "primary", "settings": settings}


def view(doc):
    """A protection as diff mode shows it: where it stands and its settings."""
    if doc is None:
        return {}
    return {
        "state": current_state(doc),
        "role": doc.get("role"),
        "settings": dict(doc.get("settings") or {}),
    }


# -- the pre-flight ------------------------------------------------------------------

SETTINGS_CHECK = "settings"
