"""Real Xen 4.17, nested under QEMU: Xen's own tools and ours on a real PV domain.

Every step runs as a job in the lab's dom0 (see ``lab/runner.py``); the
figures each test measures are printed and kept in $REMUS_LAB_RESULTS.
"""

from __future__ import annotations

import json
import re

import pytest

from lab.runner import Lab

from .conftest import RESULTS

pytestmark = [pytest.mark.nested, pytest.mark.slow, pytest.mark.timeout(1500)]

LIB = "source /opt/remus/lab/lib.sh\n"


def record(name: str, figures: dict[str, object]) -> None:
    print(f"\n{name}: {json.dumps(figures)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2))


def figures(output: str) -> dict[str, float]:
    """``FIGURE name value`` lines a job printed."""
    return {m[1]: float(m[2]) for m in re.finditer(r"^FIGURE (\S+) (\S+)$", output, re.M)}


def test_dom0_is_xen_with_shadow_paging(lab: Lab) -> None:
    r = lab.run("xl info | grep -E '^(xen_version|xen_caps|free_memory)'").check()
    assert re.search(r"xen_version\s*: 4\.17", r.output), r.output
    record("boot", {"dom0_ready_s": round(lab.boot_seconds, 1)})


def test_free_memory_is_xens_not_dom0s(lab: Lab) -> None:
    """The pre-flight's free memory is Xen's heap (xc_physinfo), which `xl info`
    reports too, not dom0's /proc/meminfo."""
    r = lab.run(
        LIB + "xl info | awk '/^free_memory/ {print \"XL\", $3}'\n"
        "python3 -c 'from orchestrator.hypervisors.xen import XenHypervisor as X;"
        "m = X().memory(); print(\"OURS\", m.free_bytes >> 20, m.claimed_bytes >> 20)'\n"
        "awk '/^MemAvailable/ {print \"DOM0\", int($2 / 1024)}' /proc/meminfo\n",
        timeout=300,  # a cold Python start-up takes 7-8 s in this dom0, more when busy
    ).check()
    got = {m[1]: int(m[2]) for m in re.finditer(r"^(XL|OURS|DOM0) (\d+)", r.output, re.M)}
    assert set(got) == {"XL", "OURS", "DOM0"}, r.output
    # xl's free_memory is free + scrub pages, ours deducts claims (none here)
    assert abs(got["OURS"] - got["XL"]) <= 1, r.output
    record("memory", {"xen_free_mib": got["OURS"], "dom0_available_mib": got["DOM0"]})


def test_xl_save_file_verifies_with_ours_and_xens(lab: Lab) -> None:
    r = lab.run(
        LIB
        + """
start_guest
kv put=planet=mars
t0=$(now); xl save -c labguest /tmp/xlsave.img >/dev/null 2>&1; t1=$(now)
echo "FIGURE xl_save_s $(echo "$t1 $t0" | awk '{print $1-$2}')"
echo "FIGURE bytes $(stat -c %s /tmp/xlsave.img)"
remusctl stream verify /tmp/xlsave.img
PYTHONPATH=/usr/lib/xen-4.17/lib/python python3 /usr/lib/xen-4.17/bin/verify-stream-v2 \
    -f xl -i /tmp/xlsave.img >/tmp/v2.out 2>&1; echo "verify-stream-v2 status $?"
tail -n 3 /tmp/v2.out
rm -f /tmp/xlsave.img
""",
        timeout=300,
    ).check()
    assert "verify-stream-v2 status 0" in r.output, r.output
    assert re.search(r"\bOK\b|valid|verified", r.output, re.I), r.output
    record("xl_save", figures(r.output))


def test_save_through_the_helper_boundary_restores_with_xl(lab: Lab) -> None:
    """Our code drives Xen's real libxl-save-helper on a real domain; Xen's xl restores it."""
    r = lab.run(
        LIB
        + """
start_guest
kv put=colour=blue >/dev/null
boot=$(kv boot); before=$(kv counter)
t0=$(now); remusctl --backend xen save labguest /tmp/ours.img || exit 1; t1=$(now)
echo "FIGURE our_save_s $(echo "$t1 $t0" | awk '{print $1-$2}')"
xl list labguest 2>/dev/null && { echo "domain still there after save"; exit 1; }
remusctl stream verify /tmp/ours.img | tail -n 2
PYTHONPATH=/usr/lib/xen-4.17/lib/python python3 /usr/lib/xen-4.17/bin/verify-stream-v2 \
    -f xl -i /tmp/ours.img >/tmp/v2.out 2>&1 || { tail /tmp/v2.out; exit 1; }
t0=$(now); xl restore /tmp/ours.img >/dev/null 2>&1 || exit 1; t1=$(now)
echo "FIGURE xl_restore_s $(echo "$t1 $t0" | awk '{print $1-$2}')"
wait_guest 60 || exit 1
echo "colour=$(kv get=colour) boot_same=$([ "$(kv boot)" = "$boot" ] && echo yes || echo no)"
echo "counter before=$before after=$(kv counter)"
rm -f /tmp/ours.img
""",
        timeout=300,
    ).check()
    assert "colour=blue boot_same=yes" in r.output, r.output
    record("helper_save", figures(r.output))


def test_remus_failover_on_real_xen_next_to_xl_remus(lab: Lab) -> None:
    """remusctl protects the PV guest, its primary is SIGKILLed: the guest runs on the
    secondary with its state, and exactly one copy runs. Then `xl remus` on the same
    guest and lab, measured the same way, for comparison."""
    ours = lab.run(LIB + "source /opt/remus/lab/jobs/remus-ours.sh\n", timeout=420)
    assert ours.rc == 0, ours.output
    f = figures(ours.output)
    assert "ours_failover_s" in f and "no failover" not in ours.output, ours.output
    assert "copies=1" in ours.output, ours.output  # fenced: never two running copies
    assert "boot_same=yes" in ours.output, ours.output  # the same guest, not a reboot
    # -n (no buffering): keys written well before the kill were checkpointed
    for i in (1, 5, 10):
        assert f"k{i}=v{i}" in ours.output, ours.output
    theirs = lab.run(LIB + "source /opt/remus/lab/jobs/xl-remus.sh\n", timeout=420)
    f.update(figures(theirs.output))
    f["xl_remus_copies_after_kill"] = float(
        re.search(r"copies=(\d+)", theirs.output).group(1)  # type: ignore[union-attr]
        if "copies=" in theirs.output
        else -1
    )
    record("remus", f)


def test_secondary_orchestrator_killed_leaves_the_primary_alone(lab: Lab) -> None:
    """The secondary's orchestrator is SIGKILLed while xl migrate-receive restores
    checkpoints: xl's input must not end (it would take that for the primary's
    failure and start a second copy). The xl guard kills xl and destroys the
    half-restored domain; the primary's guest runs on, the only copy."""
    r = lab.run(LIB + "source /opt/remus/lab/jobs/remus-secondary-dies.sh\n", timeout=420)
    print(f"\n{r.output}")
    assert r.rc == 0, r.output
    assert "guards=1" in r.output, r.output
    assert "incoming=0" in r.output and "xl_receivers=0" in r.output, r.output
    assert "primary_same=yes" in r.output and "copies=1" in r.output, r.output
    assert "answers=yes" in r.output, r.output
    assert "killed before it could fail over" in r.output, r.output
