"""`ansible-test sanity` on the collection, every test it has (validate-modules,
pylint, pep8, yamllint, import, compile, ansible-doc, runtime-metadata, ...), and
ansible-doc rendering the modules' documentation.

ansible-test puts each sanity test's requirements (pinned pylint, voluptuous, yamllint,
...) in a virtualenv of its own, bootstrapping pip there with a script it downloads
from a site this machine cannot reach (only the package registries are). In its place
goes a stand-in of a few lines (ensurepip, then pip), and the requirements come from
PyPI as pip gets them. Those virtualenvs are kept under ~/.cache/xenha-remus (the first
run takes minutes to make them; later ones reuse them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import COLLECTION, Ansible

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xenha-remus"
# what ansible-test runs as its pip bootstrap script (GET_PIP), with pip's arguments
GET_PIP_STANDIN = '''"""Stand-in for ansible-test's pip bootstrap script (written by the xenha.remus
tests: the script's download site is not reachable here): pip from the interpreter's
own ensurepip, then pip installs what ansible-test asked for."""
import ensurepip
import subprocess
import sys

ensurepip.bootstrap(upgrade=False)
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", "-q", *sys.argv[1:]]))
'''
# what pip says when it cannot get a package: the reason to skip, not to fail
PIP_UNAVAILABLE = re.compile(
    r"(No matching distribution found for \S+|Could not find a version that satisfies"
    r"[^\n]*|Failed to establish a new connection[^\n]*|Temporary failure in name "
    r"resolution|Network is unreachable)"
)


def _interpreter(tool: str) -> str:
    """The Python a console script runs with (its shebang)."""
    path = shutil.which(tool)
    assert path is not None
    first = Path(path).read_text(errors="replace").splitlines()[0]
    return first.removeprefix("#!").strip().split()[0]


# what ansible-test says of itself: its Python's version, the pip version its
# virtualenvs are bootstrapped with, and which sanity tests install requirements
ABOUT = """
import inspect, os, re, sys
import ansible_test
import ansible_test._internal.python_requirements as r
print("%d.%d" % sys.version_info[:2])
print(re.search(r"pip='([0-9.]+)'", inspect.getsource(r.get_venv_packages)).group(1))
reqs = os.path.join(os.path.dirname(ansible_test.__file__), "_data", "requirements")
print(" ".join(sorted({f[7:-4].split(".")[0] for f in os.listdir(reqs)
                       if f.startswith("sanity.") and f.endswith(".txt")})))
"""


@dataclass
class Sanity:
    root: Path
    python: str
    version: str
    env: dict[str, str]
    available: list[str]
    with_requirements: list[str]

    def run(self, *selection: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
        r = subprocess.run(
            ["ansible-test", "sanity", "--color", "no", "--python", self.version,
             "--python-interpreter", self.python, *selection],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
        )  # fmt: skip
        return r, set(re.findall(r'Running sanity test "([^"]+)"', r.stdout + r.stderr))


@pytest.fixture(scope="module")
def sanity(tmp_path_factory: pytest.TempPathFactory) -> Sanity:
    if shutil.which("ansible-test") is None:
        pytest.skip("ansible-test is not installed (Debian package ansible-core)")
    python = _interpreter("ansible-test")
    about = subprocess.run(
        [python, "-c", ABOUT], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert about.returncode == 0, about.stderr
    version, pip, requirements = about.stdout.splitlines()
    home = CACHE / "ansible-test-home"
    cache = home / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"get_pip_{pip.replace('.', '_')}.py").write_text(GET_PIP_STANDIN)
    # a copy outside any git checkout: ansible-test then takes every file of it, and
    # writes its tests/output there rather than into the work tree
    root = tmp_path_factory.mktemp("sanity") / "ansible_collections" / "xenha" / "remus"
    shutil.copytree(COLLECTION, root, ignore=shutil.ignore_patterns("output", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env["HOME"] = str(home)
    listed = subprocess.run(
        ["ansible-test", "sanity", "--list-tests"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    available = listed.stdout.split()
    needing = [t for t in available if t in requirements.split()]
    return Sanity(root, python, version, env, available, needing)


def test_ansible_test_sanity_the_tests_that_need_nothing_installed(sanity: Sanity) -> None:
    skip = [arg for t in sanity.with_requirements for arg in ("--skip-test", t)]
    r, ran = sanity.run(*skip)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ran == set(sanity.available) - set(sanity.with_requirements)
    for test in ("compile", "future-import-boilerplate", "metaclass-boilerplate", "shebang",
                 "use-argspec-type-path", "no-assert", "ignores"):  # fmt: skip
        assert test in ran, (test, sorted(ran))


@pytest.mark.timeout(900)  # the first run makes the virtualenvs: minutes
def test_ansible_test_sanity_the_tests_with_requirements(sanity: Sanity) -> None:
    """validate-modules, pylint, pep8, yamllint, import, ansible-doc, runtime-metadata,
    changelog: each in a virtualenv of its pinned requirements."""
    r, ran = sanity.run(*[arg for t in sanity.with_requirements for arg in ("--test", t)])
    output = r.stdout + r.stderr
    if r.returncode != 0 and "Installing requirements" in output:
        missing = PIP_UNAVAILABLE.search(output)
        if missing:
            pytest.skip(
                f"ansible-test could not install the requirements of "
                f"{', '.join(sanity.with_requirements)}: {missing[0]}"
            )
    assert r.returncode == 0, output
    assert ran == set(sanity.with_requirements)
    for test in ("validate-modules", "pylint", "pep8", "yamllint", "import", "ansible-doc"):
        assert test in ran, (test, sorted(ran))


def test_ansible_doc_renders_every_module(ansible: Ansible) -> None:
    env = ansible.env(ansible.base / "unused.jsonl")
    for module, says in (
        ("protection", ("state", "failed_over", "recreate", "RETURN VALUES", "protection")),
        ("host_info", ("backend", "xen_version", "netbuf", "protections")),
        ("preflight", ("protectable", "reasons", "peer_reachable")),
    ):
        r = subprocess.run(
            ["ansible-doc", f"xenha.remus.{module}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr
        for word in (*says, "socket", "token_file", "validate_certs"):
            assert word in r.stdout, (module, word)
