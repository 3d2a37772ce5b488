"""The Vagrantfile and the Ansible it provisions with, checked as far as this machine
can: `vagrant validate` (vagrant-libvirt loaded) and ansible's syntax check. Booting
the two hosts needs VT-x/AMD-V and a box download, which this machine has not."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    shutil.which("vagrant") is None, reason="vagrant is not installed (Debian package vagrant)"
)
def test_vagrant_validates_the_vagrantfile(tmp_path: Path) -> None:
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path), VAGRANT_DEFAULT_PROVIDER="libvirt")
    r = subprocess.run(
        ["vagrant", "validate"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    if "provider 'libvirt'" in r.stderr and "could not be found" in r.stderr:
        pytest.skip("the libvirt provider is missing (Debian package vagrant-libvirt)")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout


@pytest.mark.skipif(
    shutil.which("ansible-playbook") is None,
    reason="ansible is not installed (Debian package ansible)",
)
def test_playbook_syntax() -> None:
    env = dict(
        os.environ, ANSIBLE_ROLES_PATH=str(REPO / "ansible" / "roles"), ANSIBLE_LOCAL_TEMP="/tmp"
    )
    r = subprocess.run(
        ["ansible-playbook", "--syntax-check", "-i", "localhost,", "playbooks/site.yml"],
        cwd=REPO / "ansible",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_task_is_named() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    files = sorted((REPO / "ansible" / "roles").glob("*/tasks/*.yml"))
    files += sorted((REPO / "ansible" / "roles").glob("*/handlers/*.yml"))
    assert files
    for f in files:
        for task in yaml.safe_load(f.read_text()) or []:
            assert task.get("name"), f"{f.relative_to(REPO)}: a task without a name: {task}"
