"""The nested Xen lab as a pytest fixture: one QEMU-booted Xen 4.17 host per module.

Marked ``nested``; ``.ci/run`` runs these where the lab can run (root,
memory, Debian's mirror for the first build) and they skip with the reason
otherwise. REMUS_LAB=0 skips them on purpose.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.runner import Lab, LabError, build, missing

RESULTS = Path(os.environ.get("REMUS_LAB_RESULTS", "/tmp/remus-lab-results"))


# module scope, not session: an idle TCG guest still eats a core, and the rest
# of the suite (timing-sensitive Remus and COLO runs among it) should not share
# the machine with it once the lab's tests are done
@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.environ.get("REMUS_LAB") == "0":
        pytest.skip("REMUS_LAB=0: the nested Xen lab was switched off")
    why = missing()
    if why:
        pytest.skip(why)
    try:
        cache = build()
    except LabError as exc:
        pytest.skip(f"the lab's images could not be built here: {exc}")
    host = Lab(tmp_path_factory.mktemp("xenlab"), cache)
    host.start()
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        yield host
    finally:
        host.stop()
        for name in ("console.log", "dom0-boot.log"):
            src = host.workdir / name
            if src.exists():
                (RESULTS / name).write_bytes(src.read_bytes())
