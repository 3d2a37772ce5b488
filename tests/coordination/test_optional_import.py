"""tooz is needed only where a witness is used: the nested lab's dom0 has none."""

from __future__ import annotations

import subprocess
import sys


def test_the_cli_worker_and_daemon_import_without_tooz() -> None:
    code = (
        "import sys\n"
        "sys.modules['tooz'] = None\n"  # an import of it now fails, as where it is missing
        "sys.modules['etcd3gw'] = None\n"
        "import orchestrator.cli, orchestrator.protection.worker, orchestrator.service.daemon\n"
        "import asyncio\n"
        "from orchestrator.coordination import WitnessError, open_witness\n"
        "try:\n"
        "    asyncio.run(open_witness('file:///tmp/x', 'm', 1.0))\n"
        "except WitnessError as exc:\n"
        "    print(exc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "a witness needs tooz and etcd3gw installed" in r.stdout
