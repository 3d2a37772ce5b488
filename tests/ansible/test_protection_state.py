"""What the protection and preflight modules decide, apart from any I/O: the
collection's module_utils/protection_state.py, which imports nothing of Ansible, loaded
from its file. Also that its settings are exactly those remusd's API takes."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any

import pytest

from orchestrator.protection.spec import FIELDS, Mode, Netbuf, api_schema

from .conftest import COLLECTION

PATH = COLLECTION / "plugins" / "module_utils" / "protection_state.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("xenha_remus_protection_state", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ps = _load()
KINDS = {int: "int", float: "float", bool: "bool", str: "str", Mode: "str", Netbuf: "str"}


def primary(desired: str = "protected", state: str = "replicating", **settings: Any) -> dict:
    base = {"name": "vm1", "peer": "h:8002", "interval_ms": 200, "unsafe": False}
    return {
        "name": "vm1",
        "role": "primary",
        "peer": "h:8002",
        "desired": desired,
        "state": state,
        "reason": "",
        "settings": {**base, **settings},
    }


def secondary(state: str = "replicating") -> dict:
    return {"name": "vm1", "role": "secondary", "peer": "a:8002", "desired": "protected",
            "state": state, "reason": "", "settings": {}}  # fmt: skip


def test_the_settings_are_those_the_api_takes_with_their_types_and_choices() -> None:
    api = {f.name: f for f in FIELDS if f.api and f.name != "name"}
    assert list(ps.SETTING_NAMES) == list(api)
    assert dict(ps.SETTINGS) == {name: KINDS[f.kind] for name, f in api.items()}
    schema = api_schema()["properties"]
    assert list(ps.MODES) == schema["mode"]["enum"]
    assert list(ps.NETBUFS) == schema["netbuf"]["enum"]
    spec = ps.settings_argument_spec()
    assert all("default" not in opt for opt in spec.values())  # remusd's defaults apply


@pytest.mark.parametrize(
    ("state", "doc", "wanted", "recreate", "actions"),
    [
        ("present", None, {"peer": "h:8002"}, False, ["protect"]),
        ("present", primary(), {"peer": "h:8002"}, False, []),
        ("present", primary(), {"interval_ms": 200}, False, []),
        ("present", primary("paused", "paused"), {}, False, ["resume"]),
        ("present", primary(state="error"), {}, False, []),  # remusd retries by itself
        ("present", primary(), {"interval_ms": 50}, True, ["unprotect", "protect"]),
        ("present", primary("unprotected", "fenced"), {}, True, ["unprotect", "protect"]),
        ("paused", primary(), {}, False, ["pause"]),
        ("paused", primary("paused", "paused"), {}, False, []),
        ("paused", primary(), {"interval_ms": 50}, True, ["unprotect", "protect", "pause"]),
        ("absent", None, {}, False, []),
        ("absent", primary(), {}, False, ["unprotect"]),
        ("absent", primary("unprotected", "taken-over"), {}, False, ["unprotect"]),
        ("absent", primary(), {"interval_ms": 50}, False, ["unprotect"]),  # settings moot
        ("failed_over", secondary(), {}, False, ["failover"]),
        ("failed_over", secondary("failing-over"), {}, False, []),
        ("failed_over", secondary("failed-over"), {}, False, []),
        # the survivor of a failover protects the guest back to the old primary
        ("present", secondary("failed-over"), {"peer": "old:8002"}, False, ["protect"]),
        ("switched_over", primary(), {}, False, ["switchover"]),
        ("switched_over", primary(), {"interval_ms": 50}, False, ["switchover"]),  # moot
        # not replicating: asked all the same, remusd refuses it with its code (LINK_UNHEALTHY)
        ("switched_over", primary(state="starting"), {}, False, ["switchover"]),
        ("switched_over", primary("paused", "paused"), {}, False, ["switchover"]),
        # handed over, the peer not yet protecting it back: done, waited for
        ("switched_over", primary("unprotected", "switched-over"), {}, False, []),
        # the second run: this host is the secondary already
        ("switched_over", secondary("starting"), {}, False, []),
        ("switched_over", secondary(), {}, False, []),
        ("switched_over", secondary("stopped"), {}, False, []),  # the wait says it ended
    ],
)
def test_plan(state: str, doc: Any, wanted: dict, recreate: bool, actions: list[str]) -> None:
    assert ps.plan(state, "vm1", doc, wanted, recreate) == actions


@pytest.mark.parametrize(
    ("state", "doc", "wanted", "says"),
    [
        ("present", None, {}, "peer is required"),
        ("paused", None, {"peer": "h:8002"}, "protect it first"),
        ("present", primary(), {"interval_ms": 50}, "interval_ms 200 -> 50"),
        ("present", primary(), {"unsafe": True}, "unsafe False -> True"),
        ("present", primary(), {"peer": "other:8002"}, "'h:8002' -> 'other:8002'"),
        ("present", primary("unprotected", "taken-over"), {}, "has ended"),
        ("present", secondary(), {}, "is the secondary here"),
        ("absent", secondary("failed-over"), {}, "unprotect it on the primary"),
        ("present", secondary("failed-over"), {}, "give peer (the old primary)"),
        ("paused", secondary("failed-over"), {"peer": "old:8002"}, "is the secondary here"),
        ("failed_over", None, {}, "secondary's host"),
        ("failed_over", primary(), {}, "is the primary here"),
        ("failed_over", secondary("stopped"), {}, "no copy left"),
        ("switched_over", None, {}, "the remusd of the primary's host"),
        ("switched_over", secondary("failing-over"), {}, "failed over to this host"),
        ("switched_over", secondary("failed-over"), {}, "failed over to this host"),
    ],
)
def test_what_cannot_be_done_says_why(state: str, doc: Any, wanted: dict, says: str) -> None:
    with pytest.raises(ps.PlanError) as err:
        ps.plan(state, "vm1", doc, wanted)
    assert says in str(err.value)


def test_setting_changes_tell_a_bool_from_a_number() -> None:
    assert ps.setting_changes({"compare_timeout_ms": 100}, {"compare_timeout_ms": 100.0}) == {}
    assert ps.setting_changes({"interval_ms": 1}, {"interval_ms": True}) == {
        "interval_ms": (True, 1)
    }
    assert ps.setting_changes({"mode": "colo"}, {}) == {"mode": (None, "colo")}


def test_current_state_and_when_a_state_is_reached() -> None:
    assert ps.current_state(None) == "absent"
    assert ps.current_state(primary()) == "present"
    assert ps.current_state(primary("paused", "paused")) == "paused"
    assert ps.current_state(primary("unprotected", "fenced")) == "unprotected"
    assert ps.current_state(secondary()) == "secondary"
    assert ps.current_state(secondary("failed-over")) == "failed_over"
    assert ps.reached("absent", None) == (True, None)
    assert ps.reached("present", primary()) == (True, None)
    assert ps.reached("present", primary(state="starting")) == (False, None)
    assert ps.reached("present", primary("unprotected", "taken-over"))[1]
    assert ps.reached("present", None)[1] == "the protection is gone"
    assert ps.reached("paused", primary("paused", "paused")) == (True, None)
    assert ps.reached("failed_over", secondary("failed-over")) == (True, None)
    assert "did not take over" in ps.reached("failed_over", secondary("stopped"))[1]


@pytest.mark.parametrize(
    ("doc", "done", "says"),
    [
        (secondary("starting"), True, None),  # protected back to this host
        (secondary(), True, None),
        (primary("unprotected", "switched-over"), False, None),  # not yet: wait on
        (primary(), False, "it did not switch over: replicating"),
        (secondary("stopped"), False, "the protection back to this host is stopped"),
        (secondary("failed-over"), False, "the protection back to this host is failed-over"),
        (None, False, "the protection is gone"),
    ],
)
def test_when_a_switchover_is_reached(doc: Any, done: bool, says: Any) -> None:
    assert ps.reached("switched_over", doc) == (done, says)


def held(lease: Any) -> dict:
    return dict(primary(), witness={"url": "file:///w", "lease": lease, "holder": "worker"})


@pytest.mark.parametrize(
    ("doc", "code", "says"),
    [
        (primary(), None, None),
        (held("held"), None, None),
        (held("uncertain"), None, None),  # still valid: remusd hands it over
        (primary("paused", "paused"), "LINK_UNHEALTHY", "vm1 is paused, not replicating"),
        (primary(state="error"), "LINK_UNHEALTHY", "vm1 is error, not replicating"),
        (held("expired"), "WITNESS_UNHEALTHY", "the lease of vm1 is expired: it cannot be"),
        (held(None), "WITNESS_UNHEALTHY", "the lease of vm1 is not held"),
    ],
)
def test_check_mode_predicts_a_refused_switchover(doc: dict, code: Any, says: Any) -> None:
    refusal = ps.switchover_refusal(doc)
    if code is None:
        assert refusal is None
    else:
        assert refusal[0] == code and refusal[1].startswith(says)


def test_unsafe_switches_need_unsafe() -> None:
    assert ps.unsafe_problem({"no_netbuf": True, "unsafe": True}) is None
    assert ps.unsafe_problem({"no_netbuf": False}) is None
    said = ps.unsafe_problem({"no_netbuf": True, "witness": "none"})
    assert said.startswith("no_netbuf, witness: none are unsafe") and "unsafe: true" in said


def test_check_mode_predicts_the_view() -> None:
    assert ps.wanted_view("absent", "vm1", primary(), {}) == {}
    after = ps.wanted_view("present", "vm1", None, {"peer": "h:8002"})
    assert after == {"state": "present", "role": "primary",
                     "settings": {"peer": "h:8002", "name": "vm1"}}  # fmt: skip
    after = ps.wanted_view("paused", "vm1", primary(), {})
    assert after["state"] == "paused" and after["settings"]["interval_ms"] == 200
    assert ps.wanted_view("failed_over", "vm1", secondary(), {})["state"] == "failed_over"
    # as the view shows this host once the peer protected it back
    assert ps.wanted_view("switched_over", "vm1", primary(), {}) == ps.view(secondary())
    assert ps.view(primary())["state"] == "present" and ps.view(None) == {}
