"""The Ansible collection xenha.remus as a user gets it: built with `ansible-galaxy
collection build`, installed with `ansible-galaxy collection install`, and driven by
`ansible-playbook` (connection local) against real remusd processes on simulated hosts.

The modules run on Debian's /usr/bin/python3 (ansible's own), which has nothing of
this project's package: what they need of remusd they get from its API.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ..service.test_remusd import Remusd, _two

REPO = Path(__file__).resolve().parents[2]
COLLECTION = REPO / "ansible" / "ansible_collections" / "xenha" / "remus"
CALLBACKS = Path(__file__).resolve().parent / "callback_plugins"
# ansible's own interpreter (Debian's ansible is for it); the modules run there
MODULE_PYTHON = "/usr/bin/python3"
TOOLS = ("ansible-playbook", "ansible-galaxy")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def skip_without_ansible() -> None:
    missing = missing_tools()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian package ansible)")


def ansible_env(home: Path, collections: Path | None = None, **extra: str) -> dict[str, str]:
    """An environment that reads no ansible.cfg, no ~/.ansible and no proxy."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ANSIBLE_")
        and k.lower() not in ("http_proxy", "https_proxy")
        and k != "PYTHONPATH"
    }
    cfg = home / "ansible.cfg"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.touch()
    env.update(
        ANSIBLE_CONFIG=str(cfg),
        ANSIBLE_HOME=str(home),
        ANSIBLE_LOCAL_TEMP=str(home / "tmp"),
        ANSIBLE_REMOTE_TEMP=str(home / "tmp"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        ANSIBLE_PYTHON_INTERPRETER=MODULE_PYTHON,
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
    )
    env.update(extra)
    if collections is not None:
        env["ANSIBLE_COLLECTIONS_PATH"] = str(collections)
    return env


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The collection built and installed as a user would: the collections path."""
    skip_without_ansible()
    base = tmp_path_factory.mktemp("collection")
    env = ansible_env(base / "home")
    build = subprocess.run(
        ["ansible-galaxy", "collection", "build", str(COLLECTION), "--output-path", str(base)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (tarball,) = base.glob("xenha-remus-*.tar.gz")
    install = subprocess.run(
        ["ansible-galaxy", "collection", "install", str(tarball), "-p", str(base / "collections")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return base / "collections"


@dataclass
class Run:
    """One ansible-playbook run: its exit code, output and every task's result."""

    rc: int
    stdout: str
    stderr: str
    tasks: list[dict[str, Any]] = field(default_factory=list)

    def task(self, name: str) -> dict[str, Any]:
        (found,) = [t for t in self.tasks if t["task"] == name]
        return found

    def result(self, name: str) -> dict[str, Any]:
        got: dict[str, Any] = self.task(name)["result"]
        return got

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclass
class Ansible:
    """Runs playbooks with the installed collection, on localhost."""

    collections: Path
    base: Path
    runs: int = 0

    def env(self, record: Path) -> dict[str, str]:
        return ansible_env(
            self.base / "home",
            self.collections,
            ANSIBLE_CALLBACK_PLUGINS=str(CALLBACKS),
            ANSIBLE_CALLBACKS_ENABLED="record",
            REMUS_TEST_RECORD=str(record),
        )

    def play(
        self,
        tasks: list[dict[str, Any]],
        *args: str,
        module_defaults: dict[str, Any] | None = None,
    ) -> Run:
        """The tasks as one play on localhost (connection local)."""
        play: dict[str, Any] = {
            "name": "test",
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "tasks": tasks,
        }
        if module_defaults:
            play["module_defaults"] = {"group/xenha.remus.remusd": module_defaults}
        self.runs += 1
        path = self.base / f"play{self.runs}.yml"
        path.write_text(json.dumps([play], indent=1))  # JSON is YAML
        return self.playbook(str(path), *args)

    def playbook(
        self, playbook: str, *args: str, inventory: str = "localhost,", timeout: float = 180
    ) -> Run:
        self.runs += 1
        record = self.base / f"record{self.runs}.jsonl"
        record.touch()
        r = subprocess.run(
            ["ansible-playbook", "-i", inventory, "-c", "local", playbook, *args],
            capture_output=True,
            text=True,
            env=self.env(record),
            cwd=self.base,
            timeout=timeout,
        )
        tasks = [json.loads(line) for line in record.read_text().splitlines()]
        return Run(r.returncode, r.stdout, r.stderr, tasks)


@pytest.fixture
def ansible(installed: Path, tmp_path: Path) -> Ansible:
    base = tmp_path / "ansible"
    base.mkdir()
    return Ansible(installed, base)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Remusd, Remusd]]:
    """Two simulated hosts, each with its remusd, under a file witness of their own
    (tests/service/test_remusd.py's hosts; everything they started ends after)."""
    skip_without_ansible()
    yield from _two(tmp_path, f"file://{tmp_path}/witness")
