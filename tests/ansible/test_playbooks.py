"""ansible-playbook with the installed collection against two real remusd on simulated
hosts: every step's effect is read back from remusd's own API, not taken from what
the module said."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ..service.test_remusd import Remusd, _workers, wait
from .conftest import Ansible, Run

pytestmark = pytest.mark.timeout(240)


def doc(d: Remusd, name: str) -> dict[str, Any] | None:
    """The protection as remusd reports it (its list has each one's whole document),
    or None."""
    with d.api() as c:
        found = [p for p in c.get("/v1/protections") if p["name"] == name]
    return found[0] if found else None


def names(d: Remusd) -> list[str]:
    with d.api() as c:
        return sorted(p["name"] for p in c.get("/v1/protections"))


def event_kinds(d: Remusd, name: str) -> list[str]:
    with d.api() as c:
        return [e["kind"] for e in c.get(f"/v1/events?name={name}&limit=1000")]


def ok(run: Run) -> Run:
    assert run.rc == 0, run.output
    return run


def failed(run: Run, task: str) -> dict[str, Any]:
    """The result of a task that failed, as the module reported it."""
    assert run.task(task)["status"] == "failed", run.output
    return run.result(task)


def test_protect_check_again_pause_resume_fail_over_and_unprotect(
    pair: tuple[Remusd, Remusd], ansible: Ansible, tmp_path: Path
) -> None:
    a, b = pair
    # a secondary takes its heartbeat timeout from its own remusd: one no step waits
    # out, so that only the module fails vm1 over
    b.stop()
    b.start_extra = ("--set", "replication.heartbeat_timeout_ms=600000")
    b.start()
    info = a.hv.create_domain("vm1", memory_mib=16)
    peer = f"127.0.0.1:{b.port}"
    wanted = {
        "name": "vm1",
        "peer": peer,
        "interval_ms": 50,
        "heartbeat_timeout_ms": 600_000,
        "witness": a.witness,
    }
    on_a = {"socket": str(a.socket)}
    on_b = {"socket": str(b.socket)}

    def task(
        state: str = "present", _as: str = "vm1", ignore_errors: bool = False, **extra: Any
    ) -> list[dict[str, Any]]:
        """One task of the protection module (named ``_as``) for vm1."""
        base = wanted if state == "present" else {"name": "vm1"}
        body = {**base, "state": state, **extra}
        return [{"name": _as, "xenha.remus.protection": body, "ignore_errors": ignore_errors}]

    # check mode: reports the protect and its settings, and protects nothing
    r = ok(ansible.play(task(), "--check", "--diff", module_defaults=on_a))
    res = r.result("vm1")
    assert res["changed"] is True and res["actions"] == ["protect"], res
    assert res["diff"]["before"] == {}
    assert res["diff"]["after"]["settings"]["interval_ms"] == 50
    assert '+    "state": "present"' in r.stdout  # the diff as ansible shows it
    assert doc(a, "vm1") is None and names(b) == []
    assert "protected" not in event_kinds(a, "vm1")

    # for real, in diff mode: remusd protects it with the settings asked for
    r = ok(ansible.play(task(), "--diff", module_defaults=on_a))
    res = r.result("vm1")
    assert res["changed"] is True and res["actions"] == ["protect"], res
    got = doc(a, "vm1")
    assert got is not None and got["role"] == "primary" and got["state"] == "replicating"
    assert got["desired"] == "protected" and got["peer"] == peer
    for key in ("interval_ms", "heartbeat_timeout_ms", "witness"):
        assert got["settings"][key] == wanted[key], (key, got["settings"])
    assert res["diff"]["after"]["settings"] == got["settings"]
    assert res["protection"]["settings"] == got["settings"]
    assert doc(b, "vm1") is not None and doc(b, "vm1")["role"] == "secondary"  # type: ignore[index]
    worker = got["live"]["pid"]
    before = got["checkpoints"]

    # again: nothing to do, and the same worker replicates on
    r = ok(ansible.play(task(), "--diff", module_defaults=on_a))
    res = r.result("vm1")
    assert res["changed"] is False and res["actions"] == [], res
    assert res["diff"]["before"] == res["diff"]["after"]
    wait(lambda: doc(a, "vm1")["checkpoints"] > before, what="checkpoints go on")  # type: ignore[index]
    got = doc(a, "vm1")
    assert got is not None and got["live"]["pid"] == worker and got["state"] == "replicating"

    # another interval: remusd cannot change it in place, and the module says so
    r = ansible.play(task(interval_ms=100), module_defaults=on_a)
    res = failed(r, "vm1")
    assert "interval_ms 50 -> 100" in res["msg"], res
    assert "recreate: true" in res["msg"] and "in place" in res["msg"]
    got = doc(a, "vm1")
    assert got is not None and got["settings"]["interval_ms"] == 50
    assert got["live"]["pid"] == worker

    # pause, and again: replication stops, the protection stays
    r = ok(
        ansible.play(task("paused", _as="pause") + task("paused"), "--diff", module_defaults=on_a)
    )
    res = r.result("pause")
    assert res["changed"] is True and res["actions"] == ["pause"], res
    assert (res["diff"]["before"]["state"], res["diff"]["after"]["state"]) == ("present", "paused")
    assert r.result("vm1")["changed"] is False
    got = doc(a, "vm1")
    assert got is not None and (got["desired"], got["state"]) == ("paused", "paused"), got
    assert _workers(a.base) == [] and a.hv.lookup("vm1").state == "running"
    wait(lambda: doc(b, "vm1")["state"] == "stopped", what="the secondary drops its copy")  # type: ignore[index]

    # present again: resumed (a full resynchronisation, a new worker)
    r = ok(ansible.play(task(), module_defaults=on_a))
    res = r.result("vm1")
    assert res["changed"] is True and res["actions"] == ["resume"], res
    got = doc(a, "vm1")
    assert got is not None and (got["desired"], got["state"]) == ("protected", "replicating")
    assert got["live"]["pid"] not in (worker, None)
    wait(lambda: doc(b, "vm1")["state"] == "replicating", what="a new secondary")  # type: ignore[index]
    wait(lambda: doc(a, "vm1")["checkpoints"] >= 3, what="checkpoints")  # type: ignore[index]

    # the primary's host hangs (its worker stopped, its connection open) and its lease
    # lapses on the witness (the lock gone, as an etcd lease that expired); the heartbeat
    # timeout is far off, so the secondary waits: the module fails vm1 over on b
    (primary,) = _workers(a.base)
    os.kill(primary, signal.SIGSTOP)
    try:
        lock = tmp_path / "witness" / f"remus-protection-{info.uuid}"
        assert lock.exists()
        lock.unlink()
        fail_over = task("failed_over", force=True, _as="fail over") + task("failed_over")
        r = ok(ansible.play(fail_over, "--diff", module_defaults=on_b))
        res = r.result("fail over")
        assert res["changed"] is True and res["actions"] == ["failover"], res
        got = doc(b, "vm1")
        assert got is not None and got["role"] == "secondary" and got["state"] == "failed-over"
        assert res["protection"]["state"] == "failed-over"
        assert b.hv.lookup("vm1").state == "running"
        assert "failover-requested" in event_kinds(b, "vm1")
        assert r.result("vm1")["changed"] is False
    finally:
        os.kill(primary, signal.SIGCONT)

    # the old primary, back, finds its lease lost and the takeover, destroys its copy
    # and ends the protection there: present cannot undo that, absent removes it
    wait(lambda: doc(a, "vm1")["desired"] == "unprotected", timeout=60, what="ours ended")  # type: ignore[index]
    assert "took over" in doc(a, "vm1")["reason"]  # type: ignore[index]
    assert [d for d in a.hv.list_domains() if d.name == "vm1"] == []
    steps = task(_as="present", ignore_errors=True) + task("absent", _as="absent")
    r = ansible.play(steps + task("absent"), "--diff", module_defaults=on_a)
    assert r.rc == 0, r.output
    msg = failed(r, "present")["msg"]
    assert "has ended" in msg and "state: absent" in msg, msg
    res = r.result("absent")
    assert res["changed"] is True and res["actions"] == ["unprotect"], res
    assert res["diff"]["after"] == {} and res["protection"] is None
    assert r.result("vm1")["changed"] is False
    assert doc(a, "vm1") is None
    assert "unprotected" in event_kinds(a, "vm1")
    assert b.hv.lookup("vm1").state == "running"  # the copy that took over runs on


def test_preflight_gives_typed_reasons_and_host_info_the_host_and_neither_changes_anything(
    pair: tuple[Remusd, Remusd], ansible: Ansible
) -> None:
    a, b = pair
    a.hv.create_domain("vm1", memory_mib=16)
    peer = f"127.0.0.1:{b.port}"

    def preflight(task: str, **args: Any) -> dict[str, Any]:
        return {"name": task, "xenha.remus.preflight": {"peer": peer, "name": "vm1", **args}}

    tasks = [
        {"name": "host", "xenha.remus.host_info": {}},
        preflight("can"),
        preflight("no such domain", name="nope"),
        preflight("unsafe without unsafe", no_netbuf=True),
        preflight("unsafe with unsafe", no_netbuf=True, no_disk=True, unsafe=True),
        preflight("no peer there", peer="127.0.0.1:1"),
        preflight("out of bounds", interval_ms=90_000),
        preflight("COLO with a bad witness", mode="colo", witness="zk://h:2181"),
        preflight("a bad witness", witness="file://relative"),
    ]
    r = ok(ansible.play(tasks, "--check", module_defaults={"socket": str(a.socket)}))
    host = r.result("host")
    assert host["changed"] is False and host["backend"] == "sim"
    assert host["sim_host"] == str(a.base / "host") and host["xen_version"] is None
    assert host["helper"]["path"] and host["helper"]["error"] is None
    assert host["replication"]["port"] == a.port and host["protections"] == []
    assert set(host["netbuf"]) == {"plug", "nfqueue", "proxy"}
    assert host["remusd"]["version"]
    with a.api() as c:  # what remusd itself says
        assert {k: host[k] for k in ("backend", "helper", "replication")} == {
            k: c.get("/v1/host")[k] for k in ("backend", "helper", "replication")
        }

    def checks(task: str) -> list[str]:
        res = r.result(task)
        assert res["changed"] is False
        assert res["protectable"] is (not res["reasons"]) and bool(res["code"]) is bool(
            res["reasons"]
        )
        return [reason["check"] for reason in res["reasons"]]

    assert checks("can") == [] and r.result("can")["code"] is None
    assert checks("no such domain") == ["domain_exists"]
    assert r.result("no such domain")["code"] == "DOMAIN_NOT_FOUND"
    assert "nope" in r.result("no such domain")["reasons"][0]["message"]
    assert checks("unsafe without unsafe") == ["unsafe"]  # the task's own refusal stays
    assert checks("unsafe with unsafe") == []  # the probe's is left out
    assert checks("no peer there") == ["peer_reachable"]
    assert r.result("no peer there")["code"] == "PEER_UNREACHABLE"
    assert checks("out of bounds") == ["settings"]
    assert "interval_ms" in r.result("out of bounds")["reasons"][0]["message"]
    assert checks("COLO with a bad witness")[0] == "settings"
    assert "zk://h:2181" in r.result("COLO with a bad witness")["reasons"][0]["message"]
    assert checks("a bad witness") == ["settings"]
    assert r.result("a bad witness")["code"] == "NOT_PROTECTABLE"
    # nothing was protected, started or logged as protected, on either host
    assert names(a) == [] and names(b) == []
    assert _workers(a.base) == [] and _workers(b.base) == []
    assert "protected" not in event_kinds(a, "vm1")
    assert a.hv.lookup("vm1").state == "running"
    assert [d.name for d in b.hv.list_domains()] == []

    # once protected, the pre-flight says so; host_info lists it on both hosts
    tasks = [
        {"name": "protect", "xenha.remus.protection": {"name": "vm1", "peer": peer}},
        preflight("again"),
        {"name": "a", "xenha.remus.host_info": {}},
        {"name": "b", "xenha.remus.host_info": {"socket": str(b.socket)}},
    ]
    r = ok(ansible.play(tasks, module_defaults={"socket": str(a.socket)}))
    assert checks("again") == ["already_protected"]
    assert r.result("again")["code"] == "ALREADY_PROTECTED"
    assert [(p["name"], p["role"]) for p in r.result("a")["protections"]] == [("vm1", "primary")]
    assert [(p["name"], p["role"]) for p in r.result("b")["protections"]] == [("vm1", "secondary")]
    assert names(a) == ["vm1"] and doc(a, "vm1")["state"] == "replicating"  # type: ignore[index]


def test_recreate_check_mode_absent_and_clear_errors(
    pair: tuple[Remusd, Remusd], ansible: Ansible
) -> None:
    a, b = pair
    a.hv.create_domain("vm2", memory_mib=16)
    peer = f"127.0.0.1:{b.port}"

    def protection(task: str, ignore_errors: bool = False, **args: Any) -> dict[str, Any]:
        return {
            "name": task,
            "xenha.remus.protection": {"name": "vm2", **args},
            "ignore_errors": ignore_errors,
        }

    tasks = [
        protection("unsafe without unsafe", True, peer=peer, no_disk=True),
        protection("pause what is not there", True, state="paused"),
        protection("no peer", True),
        protection("no peer there", True, peer="127.0.0.1:1"),
        protection("protect", peer=peer, interval_ms=50),
        protection("fail over the primary", True, state="failed_over"),
        protection("unprotect on the secondary", True, state="absent", socket=str(b.socket)),
        protection("recreate", peer=peer, interval_ms=80, recreate=True),
        protection("absent in check mode", state="absent", check_mode=True),
    ]
    tasks[-1]["check_mode"] = True
    del tasks[-1]["xenha.remus.protection"]["check_mode"]
    r = ok(ansible.play(tasks, "--diff", module_defaults={"socket": str(a.socket)}))
    msg = failed(r, "unsafe without unsafe")["msg"]
    assert "no_disk is unsafe" in msg and "unsafe: true" in msg, msg
    assert "protect it first" in failed(r, "pause what is not there")["msg"]
    assert "peer is required" in failed(r, "no peer")["msg"]
    res = failed(r, "no peer there")
    assert res["msg"].startswith("remusd refused to protect vm2: ") and not res["changed"], res
    assert res["code"] == "PEER_UNREACHABLE" and res["status"] == 502, res
    assert [reason["check"] for reason in res["reasons"]] == ["peer_reachable"], res
    msg = failed(r, "fail over the primary")["msg"]
    assert "is the primary here" in msg and "secondary's remusd" in msg, msg
    msg = failed(r, "unprotect on the secondary")["msg"]
    assert "is the secondary here" in msg and "on the primary" in msg, msg
    res = r.result("recreate")
    assert res["changed"] is True and res["actions"] == ["unprotect", "protect"], res
    assert res["diff"]["before"]["settings"]["interval_ms"] == 50
    assert res["diff"]["after"]["settings"]["interval_ms"] == 80
    res = r.result("absent in check mode")
    assert res["changed"] is True and res["actions"] == ["unprotect"], res
    # from remusd: protected once, with the recreated settings, and still there
    got = doc(a, "vm2")
    assert got is not None and got["settings"]["interval_ms"] == 80
    assert got["state"] == "replicating" and got["settings"]["no_disk"] is False
    assert doc(b, "vm2") is not None and doc(b, "vm2")["role"] == "secondary"  # type: ignore[index]
    kinds = event_kinds(a, "vm2")
    assert kinds.count("protected") == 2 and kinds.count("unprotected") == 1, kinds

    r = ok(
        ansible.play(
            [protection("absent", state="absent"), protection("again", state="absent")],
            module_defaults={"socket": str(a.socket)},
        )
    )
    assert r.result("absent")["changed"] is True and r.result("again")["changed"] is False
    assert doc(a, "vm2") is None and a.hv.lookup("vm2").state == "running"
    wait(lambda: doc(b, "vm2")["state"] == "stopped", what="the secondary drops its copy")  # type: ignore[index]
    assert [d.name for d in b.hv.list_domains()] == []


def test_https_with_a_bearer_token(ansible: Ansible, tmp_path: Path) -> None:
    """remusd's TCP listener with TLS: every module takes url, token or token_file,
    validate_certs and ca_path; a wrong token or an unchecked certificate is refused."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (Debian package openssl): no certificate")
    certs = tmp_path / "tls"
    certs.mkdir()
    cert, key = certs / "cert.pem", certs / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    d = Remusd(tmp_path / "a", 30000 + random.randrange(20000))
    tcp = d.port + 1
    d.start_extra = (
        "--set", f"api.tcp=127.0.0.1:{tcp}", "--set", f"api.token_file={token}",
        "--set", f"api.tls_cert={cert}", "--set", f"api.tls_key={key}",
    )  # fmt: skip
    d.start()
    try:
        url = f"https://127.0.0.1:{tcp}"
        info = "xenha.remus.host_info"
        tasks = [
            {"name": "token file, CA", info: {"token_file": str(token), "ca_path": str(cert)}},
            {"name": "token, unchecked", info: {"token": "s3cret", "validate_certs": False}},
            {
                "name": "absent over https",
                "xenha.remus.protection": {
                    "name": "vm9",
                    "state": "absent",
                    "token_file": str(token),
                    "ca_path": str(cert),
                },
            },
            {"name": "no CA", info: {"token": "s3cret"}, "ignore_errors": True},
            {
                "name": "wrong token",
                info: {"token": "nope", "ca_path": str(cert)},
                "ignore_errors": True,
            },
            {
                "name": "both",
                info: {"token": "s3cret", "socket": str(d.socket)},
                "ignore_errors": True,
            },
        ]
        r = ok(ansible.play(tasks, module_defaults={"url": url}))
        assert r.result("token file, CA")["backend"] == "sim"
        assert r.result("token, unchecked")["replication"]["port"] == d.port
        assert r.result("absent over https")["changed"] is False
        msg = failed(r, "no CA")["msg"]
        assert url in msg and "certificate" in msg.lower(), msg
        msg = failed(r, "wrong token")["msg"]
        assert "UNAUTHORIZED" in msg and "401" in msg, msg
        assert "mutually exclusive" in failed(r, "both")["msg"]
    finally:
        d.stop()


def test_the_example_playbook_protects_each_hosts_domains_to_its_peer(
    pair: tuple[Remusd, Remusd], ansible: Ansible
) -> None:
    """xenha.remus.pair, its protect plays, on the two simulated hosts (its install
    plays need real Xen hosts: the Vagrantfile's)."""
    a, b = pair
    a.hv.create_domain("web", memory_mib=16)
    b.hv.create_domain("db", memory_mib=16)
    hosts = {
        "all": {
            "hosts": {
                "xen-a": {
                    "remus_api_socket": str(a.socket),
                    "remus_peer": f"127.0.0.1:{b.port}",
                    "remus_protect": ["web"],
                },
                "xen-b": {
                    "remus_api_socket": str(b.socket),
                    "remus_peer": f"127.0.0.1:{a.port}",
                    "remus_protect": ["db"],
                },
            },
            "vars": {"ansible_connection": "local", "ansible_become": False},
        }
    }
    inventory = ansible.base / "hosts.yml"
    inventory.write_text(json.dumps(hosts))
    r = ok(ansible.playbook("xenha.remus.pair", "--tags", "protect", inventory=str(inventory)))
    protected = [
        item
        for t in r.tasks
        if t["action"] == "xenha.remus.protection" and t["status"] == "ok"
        for item in t["result"]["results"]
    ]
    assert sorted(i["item"] for i in protected) == ["db", "web"], r.tasks
    assert all(i["changed"] and i["actions"] == ["protect"] for i in protected), protected
    web, db = doc(a, "web"), doc(b, "db")
    assert web is not None and web["role"] == "primary" and web["state"] == "replicating"
    assert db is not None and db["role"] == "primary" and db["state"] == "replicating"
    assert web["peer"] == f"127.0.0.1:{b.port}" and db["peer"] == f"127.0.0.1:{a.port}"
    assert doc(b, "web")["role"] == doc(a, "db")["role"] == "secondary"  # type: ignore[index]
    # a domain that cannot be protected stops the play with the pre-flight's reasons
    hosts["all"]["hosts"]["xen-a"]["remus_protect"] = ["web", "nope"]  # type: ignore[index]
    inventory.write_text(json.dumps(hosts))
    r = ansible.playbook("xenha.remus.pair", "--tags", "protect", inventory=str(inventory))
    assert r.rc != 0
    (stop,) = [t for t in r.tasks if t["status"] == "failed"]
    (why,) = [i["msg"] for i in stop["result"]["results"] if i.get("failed")]
    assert why.startswith("nope cannot be protected: no domain 'nope'"), why
    assert stop["task"] == "Stop on a domain that cannot be", stop  # on xen-a only
    assert names(a) == ["db", "web"]  # the secondary of db, and web: nothing new
    assert doc(a, "web")["live"]["pid"] == web["live"]["pid"]  # type: ignore[index]


def test_switch_over_and_back_and_protect_back_after_a_failover(
    pair: tuple[Remusd, Remusd], ansible: Ansible
) -> None:
    """state: switched_over against the primary's remusd, twice (the second changes
    nothing), then against the other host's to switch back; after a failover, present
    on the survivor protects the guest back to the old primary."""
    a, b = pair
    a.hv.create_domain("vm1", memory_mib=16)
    on_a, on_b = {"socket": str(a.socket)}, {"socket": str(b.socket)}

    def task(state: str, _as: str = "vm1", **extra: Any) -> list[dict[str, Any]]:
        body = {"name": "vm1", "state": state, **extra}
        return [{"name": _as, "xenha.remus.protection": body, "register": "out"}]

    ok(ansible.play(task("present", peer=f"127.0.0.1:{b.port}", interval_ms=50),
                    module_defaults=on_a))  # fmt: skip
    wait(lambda: (doc(a, "vm1") or {}).get("checkpoints", 0) >= 3, what="checkpoints")
    r = ok(ansible.play(task("switched_over", _as="switch") + task("switched_over"),
                        module_defaults=on_a))  # fmt: skip
    res = r.result("switch")
    assert res["changed"] is True and res["actions"] == ["switchover"], res
    assert isinstance(res["switchover_pause_ms"], float), res
    assert r.result("vm1")["changed"] is False
    here, there = doc(a, "vm1"), doc(b, "vm1")
    assert here is not None and here["role"] == "secondary", here
    assert there is not None and there["role"] == "primary", there
    assert b.hv.lookup("vm1").state == "running"
    assert "switched-over" in event_kinds(a, "vm1") and "role-changed" in event_kinds(b, "vm1")

    wait(lambda: (doc(b, "vm1") or {}).get("state") == "replicating", what="protected back")
    r = ok(ansible.play(task("switched_over", _as="back"), module_defaults=on_b))
    assert r.result("back")["changed"] is True
    assert doc(a, "vm1")["role"] == "primary" and doc(b, "vm1")["role"] == "secondary"  # type: ignore[index]
    assert a.hv.lookup("vm1").state == "running"

    # the primary's worker dies and its host's remusd with it: b takes over, and once
    # a's remusd is back (and has dropped its copy), present on b protects it back
    wait(lambda: (doc(a, "vm1") or {}).get("state") == "replicating", what="replicating")
    a.stop(signal.SIGKILL)
    for pid in _workers(a.base):
        os.kill(pid, signal.SIGKILL)
    wait(lambda: (doc(b, "vm1") or {}).get("state") == "failed-over", what="the failover")
    a.start()
    wait(lambda: [d for d in a.hv.list_domains() if d.name == "vm1"] == [], what="a's copy")
    r = ok(ansible.play(task("present", peer=f"127.0.0.1:{a.port}", interval_ms=50),
                        module_defaults=on_b))  # fmt: skip
    assert r.result("vm1")["actions"] == ["protect"], r.result("vm1")
    got = doc(b, "vm1")
    assert got is not None and (got["role"], got["state"]) == ("primary", "replicating"), got
    assert doc(a, "vm1")["role"] == "secondary"  # type: ignore[index]
