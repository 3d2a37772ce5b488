"""The Xen backend's parts that need no running Xen: xl's JSON, xenstore paths,
the ctypes layout against the installed headers, the fence guard's decisions
(and the guard itself, as a real process, on the simulated hypervisor).

``xl_list_pv.json`` is what `xl list -l` printed for the nested lab's PV guest
(Xen 4.17, Debian 12 dom0), which is also what our primary sends in HELLO.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.hypervisors import xenctrl
from orchestrator.hypervisors.base import HypervisorError
from orchestrator.hypervisors.select import open_hypervisor
from orchestrator.hypervisors.sim import SimHypervisor
from orchestrator.hypervisors.xen import (
    XlListError,
    available,
    control_shutdown_path,
    domain_type_of,
    memory_bytes_of,
    parse_xl_list_long,
    suspend_evtchn_path,
    vif_backend_path,
)
from orchestrator.protection.fence import Action, FenceGuard, decide, marker_path

HERE = Path(__file__).parent
HVM_SAMPLE = """[
    {
        "domid": 7,
        "config": {
            "c_info": {"type": "hvm", "name": "win",
                       "uuid": "0b7c2d64-1e9c-4d5b-9a57-2f0f6b1d2e11"},
            "b_info": {"max_vcpus": 2, "max_memkb": 2097152, "target_memkb": 2097152,
                       "device_model_version": "qemu_xen", "type.hvm": {"firmware": "seabios"}},
            "disks": [{"pdev_path": "/dev/vg0/win", "vdev": "hda", "format": "raw"}],
            "nics": [{"devid": 0, "mac": "00:16:3e:00:00:07", "bridge": "xenbr0"}]
        }
    }
]"""


def test_xl_list_long_of_a_real_pv_guest() -> None:
    configs = parse_xl_list_long((HERE / "xl_list_pv.json").read_text())
    assert list(configs) == [4]
    cfg = configs[4]
    assert cfg["c_info"]["name"] == "labguest"
    assert domain_type_of(cfg) == "pv"
    assert memory_bytes_of(cfg) == 128 << 20
    assert cfg["nics"][0]["bridge"] == "xenbr0"


def test_xl_list_long_of_an_hvm_guest_and_of_one_domain_object() -> None:
    configs = parse_xl_list_long(HVM_SAMPLE)
    assert domain_type_of(configs[7]) == "hvm"
    assert memory_bytes_of(configs[7]) == 2 << 30
    one = json.dumps(json.loads(HVM_SAMPLE)[0])  # `xl list -l DOMID` of older xl
    assert list(parse_xl_list_long(one)) == [7]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "no JSON"),
        ('[{"domid": 1}]', "entry 0 has no domid and config"),
        ('[{"domid": 1, "config": []}]', "config is not an object"),
        ("42", "not a list"),
        ('[{"domid": 1, "config": {"c_info": {}}}]', None),
    ],
)
def test_xl_list_long_errors_say_what_is_wrong(text: str, needle: str | None) -> None:
    if needle is None:  # parses, but the type is unknown
        cfg = parse_xl_list_long(text)[1]
        with pytest.raises(XlListError, match="unknown domain type"):
            domain_type_of(cfg)
        return
    with pytest.raises(XlListError, match=needle):
        parse_xl_list_long(text)


def test_xenstore_paths() -> None:
    assert control_shutdown_path(5) == "/local/domain/5/control/shutdown"
    assert suspend_evtchn_path(5) == "/local/domain/5/device/suspend/event-channel"
    assert vif_backend_path(5) == "/local/domain/0/backend/vif/5/0"


HEADER_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <xenctrl.h>
#include <xen/version.h>
#include <xen/sched.h>
#define F(f) printf(#f " %zu\n", offsetof(xc_domaininfo_t, f));
int main(void) {
    printf("sizeof %zu\n", sizeof(xc_domaininfo_t));
    F(domain) F(flags) F(tot_pages) F(max_pages) F(outstanding_pages) F(shr_pages)
    F(paged_pages) F(shared_info_frame) F(cpu_time) F(nr_online_vcpus) F(max_vcpu_id)
    F(ssidref) F(handle) F(cpupool) F(gpaddr_bits) F(arch_config)
    printf("XEN_DOMINF_dying %u\nXEN_DOMINF_hvm_guest %u\nXEN_DOMINF_shutdown %u\n",
           XEN_DOMINF_dying, XEN_DOMINF_hvm_guest, XEN_DOMINF_shutdown);
    printf("XEN_DOMINF_paused %u\nXEN_DOMINF_blocked %u\nXEN_DOMINF_running %u\n",
           XEN_DOMINF_paused, XEN_DOMINF_blocked, XEN_DOMINF_running);
    printf("XEN_DOMINF_hap %u\n", XEN_DOMINF_hap);
    printf("XEN_DOMINF_shutdownmask %u\nXEN_DOMINF_shutdownshift %u\n",
           XEN_DOMINF_shutdownmask, XEN_DOMINF_shutdownshift);
    printf("XENVER_version %d\nXENVER_extraversion %d\nSHUTDOWN_suspend %d\n",
           XENVER_version, XENVER_extraversion, SHUTDOWN_suspend);
    printf("XC_PAGE_SIZE %d\n", XC_PAGE_SIZE);
#define P(f) printf("physinfo." #f " %zu\n", offsetof(xc_physinfo_t, f));
    printf("physinfo.sizeof %zu\n", sizeof(xc_physinfo_t));
    P(nr_cpus) P(capabilities) P(pad) P(total_pages) P(free_pages) P(scrub_pages)
    P(outstanding_pages) P(max_mfn) P(hw_cap)
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
@pytest.mark.skipif(
    not Path("/usr/include/xenctrl.h").exists(),
    reason="/usr/include/xenctrl.h is missing (Debian package libxen-dev)",
)
def test_ctypes_layout_matches_the_installed_headers(tmp_path: Path) -> None:
    src = tmp_path / "probe.c"
    src.write_text(HEADER_PROBE)
    exe = tmp_path / "probe"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True)
    c = {
        k: int(v)
        for k, v in (
            line.split() for line in subprocess.check_output([exe], text=True).splitlines()
        )
    }
    phys = {k.split(".", 1)[1]: c.pop(k) for k in list(c) if k.startswith("physinfo.")}
    assert ctypes.sizeof(xenctrl.XcPhysinfoStruct) == phys.pop("sizeof")
    for name, offset in phys.items():
        assert getattr(xenctrl.XcPhysinfoStruct, name).offset == offset, name
    s = xenctrl.XcDomainInfoStruct
    assert ctypes.sizeof(s) == c.pop("sizeof")
    for name in list(c):
        if hasattr(s, name):
            assert getattr(s, name).offset == c.pop(name), name
    for name, value in c.items():
        assert getattr(xenctrl, name) == value, name


@pytest.mark.skipif(
    not Path("/usr/lib/x86_64-linux-gnu/libxenctrl.so.4.17").exists(),
    reason="libxenctrl.so.4.17 is not installed (Debian package libxenmisc4.17)",
)
def test_every_function_we_declare_is_in_the_libraries() -> None:
    ctrl, guest = xenctrl.load()  # declares argtypes: a missing symbol raises here
    for fn in ("xc_interface_open", "xc_domain_getinfolist", "xc_domain_pause",
               "xc_domain_unpause", "xc_domain_destroy", "xc_version"):  # fmt: skip
        assert hasattr(ctrl, fn)
    assert hasattr(guest, "xc_domain_resume")


@pytest.mark.skipif(os.path.exists("/dev/xen/privcmd"), reason="this is a Xen dom0")
def test_without_xen_the_backend_says_why() -> None:
    why = available()
    assert why is not None and "privcmd" in why
    with pytest.raises(xenctrl.XenCtrlError, match="privcmd"):
        xenctrl.XenCtrl()
    with pytest.raises(HypervisorError, match=r"cannot run here: .*privcmd"):
        open_hypervisor("xen")
    assert open_hypervisor("auto").name == "sim"


def test_uuid_and_state_from_domain_info() -> None:
    raw = xenctrl.XcDomainInfoStruct()
    raw.domain = 3
    raw.flags = xenctrl.XEN_DOMINF_shutdown | (
        xenctrl.SHUTDOWN_suspend << xenctrl.XEN_DOMINF_shutdownshift
    )
    raw.handle[:] = bytes(range(16))
    info = xenctrl._convert(raw)
    assert info.uuid == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert info.suspended and info.state == "shutdown" and info.shutdown_reason_name == "suspend"
    raw.flags = xenctrl.XEN_DOMINF_paused
    assert xenctrl._convert(raw).state == "paused"


@pytest.mark.parametrize(
    ("said", "state", "reason", "action"),
    [
        (b"", "running", "", Action.NOTHING),
        (b"", "shutdown", "suspend", Action.RESUME),
        (b"", "paused", "", Action.UNPAUSE),
        (b"P", "shutdown", "suspend", Action.HOLD),
        (b"PA", "running", "", Action.FENCE),
        (b"PA", "shutdown", "suspend", Action.FENCE),
        (b"PAD", "running", "", Action.NOTHING),
        (b"PD", "shutdown", "suspend", Action.NOTHING),
    ],
)
def test_fence_decisions(said: bytes, state: str, reason: str, action: Action) -> None:
    assert decide(said, state, reason) is action


def _wait_for(cond: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:  # a hang guard, not a measurement
            raise TimeoutError(f"condition not met within {timeout:g} s")
        time.sleep(0.05)


def test_fence_guard_destroys_an_armed_primary_and_resumes_an_unarmed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard as a real process: its pipe ends without D when we close it
    without disarming, as when the primary is SIGKILLed."""
    hv = SimHypervisor(tmp_path / "host")
    monkeypatch.setenv("REMUS_SIM_HOST", str(hv.host))
    status = tmp_path / "status"
    status.mkdir()
    try:
        armed = hv.create_domain("armed", 16)
        guard = FenceGuard("sim", armed.domid, "armed", status)
        guard.pending()
        guard.arm()
        guard._pipe.close()  # the primary died
        assert guard.proc.wait(30) == 0
        assert "armed" not in {d.name for d in hv.list_domains()}
        assert marker_path(status, "armed").exists()

        quiet = hv.create_domain("quiet", 16)
        asyncio.run(hv.suspend(quiet.domid))
        guard = FenceGuard("sim", quiet.domid, "quiet", status)
        guard._pipe.close()  # died before any checkpoint: nothing to fail over to
        assert guard.proc.wait(30) == 0
        _wait_for(lambda: hv.lookup("quiet").state == "running")
        assert not marker_path(status, "quiet").exists()

        calm = hv.create_domain("calm", 16)
        guard = FenceGuard("sim", calm.domid, "calm", status)
        guard.pending()
        guard.arm()
        guard.disarm()  # replication ended on purpose: the domain stays
        assert guard.proc.returncode == 0
        assert hv.lookup("calm").state == "running"
    finally:
        for d in hv.list_domains():
            hv.destroy(d.domid)
