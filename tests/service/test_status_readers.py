"""remusd reads its workers' ProtectionStatus, typed: the API's protection document and the
metrics, each gauge in its own unit, from a status file as a worker writes it."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest

from orchestrator.protection.spec import Mode, ProtectionSpec
from orchestrator.protection.status import ColoFigures, ProtectionStatus, Role, State
from orchestrator.service import config
from orchestrator.service.daemon import (
    COLO_PRIMARY_FIELDS,
    COLO_SECONDARY_FIELDS,
    PROTECTION_SCHEMA,
    STATUS_LEVEL,
    Service,
)
from orchestrator.service.http import validate


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    cfg = config.load(
        None,
        {
            "state.dir": str(tmp_path / "state"),
            "state.host": str(tmp_path / "host"),
            "api.socket": str(tmp_path / "api.sock"),
            "replication.listen": "127.0.0.1:0",
        },
    )
    s = Service(cfg)
    yield s
    s.registry.close()


def test_every_colo_figure_the_api_serves_is_an_attribute_of_the_status() -> None:
    own = {f.name for f in fields(ProtectionStatus)}
    figures = {f.name for f in fields(ColoFigures)}
    assert own >= STATUS_LEVEL
    for key in {*COLO_PRIMARY_FIELDS, *COLO_SECONDARY_FIELDS}:
        assert key in (STATUS_LEVEL if key in own else figures), key


def _sample(text: str, metric: str, **labels: str) -> float | None:
    for m in re.finditer(rf"^{metric}\{{([^}}]*)\}} (\S+)$", text, re.M):
        if all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return None


def _publish(service: Service, st: ProtectionStatus) -> None:
    st.write(service.supervisor.status_path(st.name))


def test_a_colo_primary_as_the_api_and_the_metrics_see_it(service: Service) -> None:
    spec = ProtectionSpec("vm1", "hostb:8002", Mode.COLO, checkpoint_max_interval_ms=1500)
    service.registry.add_protection("vm1", "primary", spec.peer, "colo", spec=spec)
    colo = ColoFigures(
        checkpoints_by_divergence=1,
        checkpoints_by_held_output=0,
        checkpoints_by_timer=2,
        compared_packets=5,
        mismatches=1,
        mirrored_packets=9,
        compare_wait_ms_p50=40.0,
        compare_wait_ms_p99=90.0,
    )
    st = ProtectionStatus(
        "vm1",
        Role.PRIMARY,
        Mode.COLO,
        state=State.REPLICATING,
        peer=spec.peer,
        checkpoints=3,
        last_checkpoint_at=time.time() - 10,
        ack_lag_ms_p50=250.0,
        pause_ms_p50=1.5,
        held_packets=4,
        colo=colo,
    )
    _publish(service, st)

    p = service._protection("vm1")
    validate(PROTECTION_SCHEMA, p)
    assert p["state"] == "replicating" and p["checkpoints"] == 3
    assert p["disk"] == "not replicated"
    assert p["settings"]["checkpoint_max_interval_ms"] == 1500 and p["settings"]["mode"] == "colo"
    # the status's own figures and COLO's, under the API's names
    assert p["colo"]["checkpoints"] == 3 and p["colo"]["pause_ms_p50"] == 1.5
    assert p["colo"]["held_packets"] == 4 and p["colo"]["compared_packets"] == 5
    assert p["colo"]["compare_wait_ms_p99"] == 90.0 and p["colo"]["matched_bytes"] is None
    assert p["live"]["pid"] == st.pid and "pause_histogram" not in p["live"]

    text = service.render_metrics().decode()
    labels = {"domain": "vm1", "peer": spec.peer}
    assert _sample(text, "remus_ack_lag_seconds", **labels) == 0.25  # ms, scaled by name
    assert _sample(text, "remus_colo_compare_wait_seconds", **labels) == 0.04
    age = _sample(text, "remus_last_checkpoint_age_seconds", **labels)
    assert age is not None and 9 < age < 60
    assert _sample(text, "remus_colo_held_packets", **labels) == 4
    assert _sample(text, "remus_dirty_pages", **labels) is None  # not measured: no series
    assert _sample(text, "remus_checkpoints_total", **labels) == 3
    assert _sample(text, "remus_colo_checkpoints_total", reason="timer", **labels) == 2
    assert _sample(text, "remus_colo_mismatches_total", **labels) == 1

    # the worker counts on; remusd adds what is new since it last looked
    colo.checkpoints_by_timer, colo.mismatches = 5, 1
    st.checkpoints = 6
    _publish(service, st)
    text = service.render_metrics().decode()
    assert _sample(text, "remus_checkpoints_total", **labels) == 6
    assert _sample(text, "remus_colo_checkpoints_total", reason="timer", **labels) == 5
    assert _sample(text, "remus_colo_mismatches_total", **labels) == 1


def test_a_remus_secondary_and_a_missing_status(service: Service) -> None:
    service.registry.add_protection("vm2", "secondary", "hosta", "remus")
    p = service._protection("vm2")  # no status file yet: the registry's word
    validate(PROTECTION_SCHEMA, p)
    assert p["state"] == "starting" and p["live"] == {} and p["settings"] == {}
    assert p["colo"] is None and p["disk"] is None
    _publish(
        service,
        ProtectionStatus(
            "vm2", Role.SECONDARY, state=State.FAILED_OVER, peer="hosta", last_heartbeat_age_s=3.0
        ),
    )
    p = service._protection("vm2")
    assert p["state"] == "failed-over" and p["live"]["last_heartbeat_age_s"] == 3.0
    text = service.render_metrics().decode()
    assert _sample(text, "remus_failovers_total", domain="vm2") == 1
    assert "remus_colo_compare_wait_seconds{" not in text


def test_the_lease_as_the_api_and_the_metrics_see_it(service: Service) -> None:
    """A worker's lease (issue 22) through its status file: the API's witness document,
    the remus_witness_* gauges, and fenced and unprotected as states with their reason;
    the witness's password is shown nowhere."""
    url = "etcd3+http://remus:s3cret@10.0.0.9:2379"
    shown = "etcd3+http://remus:***@10.0.0.9:2379"
    spec = ProtectionSpec("vm1", "hostb:8002", witness=url)
    service.registry.add_protection("vm1", "primary", spec.peer, "remus", spec=spec)
    st = ProtectionStatus(
        "vm1", Role.PRIMARY, state=State.REPLICATING, peer=spec.peer, witness=url,
        lease="held", lease_valid_for_s=2.25,
    )  # fmt: skip
    _publish(service, st)
    p = service._protection("vm1")
    validate(PROTECTION_SCHEMA, p)
    assert p["witness"] == {
        "url": shown, "lease": "held", "lease_valid_for_s": 2.25, "lease_expires": True,
        "holder": "worker",
    }  # fmt: skip
    labels = {"domain": "vm1", "peer": spec.peer, "role": "primary"}
    text = service.render_metrics().decode()
    assert _sample(text, "remus_witness_lease_held", **labels) == 1
    assert _sample(text, "remus_witness_lease_valid_seconds", **labels) == 2.25
    assert _sample(text, "remus_witness_lease_state", state="held", **labels) == 1
    assert _sample(text, "remus_witness_info", domain="vm1", role="primary", witness=shown) == 1
    assert _sample(text, "remus_unprotected", domain="vm1", peer=spec.peer) == 0
    assert "s3cret" not in text

    # the lease lost: the worker fenced its guest, and says why
    st.state, st.lease, st.lease_valid_for_s = State.FENCED, "lost", None
    st.reason = "fenced: lease lost: another member holds it"
    _publish(service, st)
    p = service._protection("vm1")
    validate(PROTECTION_SCHEMA, p)
    assert p["state"] == "fenced" and p["reason"] == st.reason
    assert p["witness"]["lease"] == "lost" and p["witness"]["holder"] is None
    text = service.render_metrics().decode()
    assert _sample(text, "remus_witness_lease_held", **labels) == 0
    assert _sample(text, "remus_witness_lease_valid_seconds", **labels) is None  # not held
    assert _sample(text, "remus_witness_lease_state", state="lost", **labels) == 1
    assert _sample(text, "remus_witness_lease_state", state="held", **labels) is None

    # the secondary lost, the lease held: the guest runs on here, unprotected
    st.state, st.lease, st.lease_valid_for_s = State.UNPROTECTED, "held", 1.5
    st.reason = "ack timeout: the secondary is gone"
    _publish(service, st)
    p = service._protection("vm1")
    assert p["state"] == "unprotected" and p["reason"] == st.reason
    text = service.render_metrics().decode()
    assert _sample(text, "remus_unprotected", domain="vm1", peer=spec.peer) == 1
    assert _sample(text, "remus_witness_lease_held", **labels) == 1

    # a file witness's lock is held until its holder dies: no validity to count down
    st.witness, st.lease_valid_for_s = "file:///var/lib/remus/witness", None
    _publish(service, st)
    p = service._protection("vm1")
    assert p["witness"]["lease_valid_for_s"] is None and p["witness"]["lease_expires"] is False
    text = service.render_metrics().decode()
    assert _sample(text, "remus_witness_lease_valid_seconds", **labels) == float("inf")

    # no witness (unsafe): none shown, no series
    unsafe = ProtectionSpec("vm2", "hostb:8002", witness="none", unsafe=True)
    service.registry.add_protection("vm2", "primary", unsafe.peer, "remus", spec=unsafe)
    p = service._protection("vm2")
    validate(PROTECTION_SCHEMA, p)
    assert p["witness"] is None
    text = service.render_metrics().decode()
    assert _sample(text, "remus_witness_lease_held", domain="vm2") is None
    assert _sample(text, "remus_witness_info", domain="vm2") is None
