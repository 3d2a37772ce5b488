"""The collection's roles and playbooks as far as this machine can take them: the
remusd role's templates rendered by ansible from the role itself (no path of the
controller's) into a configuration remusd accepts and the unit packaging/ ships, and
the playbooks' syntax as Vagrant's provisioner and a user of the collection run them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from orchestrator.service import config as remusd_config

from .conftest import COLLECTION, REPO, Ansible, ansible_env

ROLE = COLLECTION / "roles" / "remusd"


def directives(unit: str) -> list[str]:
    return [line for line in unit.splitlines() if line.strip() and not line.startswith("#")]


def test_the_remusd_role_renders_a_configuration_remusd_accepts_and_the_packaged_unit(
    ansible: Ansible, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    role = ansible.collections / "ansible_collections" / "xenha" / "remus" / "roles" / "remusd"
    tasks = [
        {
            "name": f"render {name}",
            "ansible.builtin.template": {
                "src": str(role / "templates" / f"{name}.j2"),
                "dest": str(out / name),
                "mode": "0644",
            },
        }
        for name in ("remusd.toml", "remusd.service")
    ]
    play = {
        "name": "render",
        "hosts": "localhost",
        "gather_facts": False,
        "vars_files": [str(role / "defaults" / "main.yml")],
        "tasks": tasks,
    }
    path = ansible.base / "render.yml"
    path.write_text(json.dumps([play]))
    witness = f"file://{tmp_path}/witness"
    extra = {"remus_witness_url": witness, "remus_replication_address": "127.0.0.11"}
    r = ansible.playbook(str(path), "-e", json.dumps(extra))
    assert r.rc == 0, r.output
    cfg = remusd_config.load(out / "remusd.toml")  # remusd's own loader: strict, names keys
    assert cfg.replication.listen == "127.0.0.11:8002"
    assert cfg.api.socket == "/run/remus/remusd.sock"
    assert (cfg.witness.url, cfg.witness.lease_ttl_ms) == (witness, 3000)
    assert (cfg.replication.interval_ms, cfg.replication.heartbeat_timeout_ms) == (200, 300)
    unit = (out / "remusd.service").read_text()
    assert "ExecStart=/opt/remus/.venv/bin/remusd --config /etc/remus/remusd.toml" in unit
    shipped = (REPO / "packaging" / "remusd.service").read_text()
    # every directive of the packaged unit but where remusd is, the role's being its venv
    assert [d for d in directives(unit) if not d.startswith("ExecStart=")] == [
        d for d in directives(shipped) if not d.startswith("ExecStart=")
    ]
    # the tasks template from the role itself: no src under remus_src (the managed
    # host's checkout, which the controller under Vagrant does not have)
    main = yaml.safe_load((ROLE / "tasks" / "main.yml").read_text())
    template = "ansible.builtin.template"
    sources = [t[template]["src"] for t in main if template in t]
    assert sorted(sources) == ["remusd.service.j2", "remusd.toml.j2"]
    assert all((ROLE / "templates" / s).is_file() for s in sources)


def test_playbook_syntax_as_vagrant_and_a_user_of_the_collection_run_them(
    ansible: Ansible, tmp_path: Path
) -> None:
    # Vagrant: ansible/playbooks/site.yml with ANSIBLE_CONFIG=ansible/ansible.cfg, from
    # the Vagrantfile's directory; the collection found next to ansible.cfg
    env = ansible_env(tmp_path / "home", ANSIBLE_CONFIG=str(REPO / "ansible" / "ansible.cfg"))
    r = subprocess.run(
        ["ansible-playbook", "--syntax-check", "-i", "localhost,", "ansible/playbooks/site.yml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # the installed collection's example playbook, by its name
    run = ansible.playbook("xenha.remus.pair", "--syntax-check")
    assert run.rc == 0, run.output
    vagrantfile = (REPO / "Vagrantfile").read_text()
    assert 'ansible.playbook = "ansible/playbooks/site.yml"' in vagrantfile
    assert '"remus_peer" =>' in vagrantfile  # the pair playbook protects to it
    assert "remus_peer" in (COLLECTION / "playbooks" / "pair.yml").read_text()
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    assert "remus_peer" not in defaults  # the playbook's, not an unused role variable
