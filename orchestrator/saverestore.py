"""`xl save` and `xl restore` through the helper boundary, on any backend.

Save writes xl's savefile header (with the libxl JSON config), the libxl
header and LIBXC_CONTEXT, lets the save helper write the libxc layer, and
after the helper has exited writes libxl's trailing records and END
(protocol notes 4.3). Restore reads the same layers back with exact reads,
hands the fd to the restore helper at LIBXC_CONTEXT, and takes it back when
the helper exits. A failed restore leaves no half-created domain behind.
"""

from __future__ import annotations

import io
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .hypervisors.base import DomainInfo, Hypervisor, HypervisorError
from .savehelper import (
    Callbacks,
    HelperFailed,
    HelperResult,
    HelperSession,
    Mode,
    RestoreArgs,
    SaveArgs,
    StreamType,
)
from .streams import Record, StreamDecoder, StreamError, libxl, xl
from .streams.decoder import StreamEnd, XlHeader
from .streams.fileio import iter_events, verify_file

log = logging.getLogger(__name__)


class SaveRestoreError(Exception):
    pass


@dataclass
class SaveReport:
    path: Path
    bytes: int
    helper: HelperResult


def _helper_error(result: HelperResult) -> str:
    """The helper's first error line: the cause; later ones ("Restore failed") are echoes."""
    errors = [r.text for r in result.logs if r.level >= 8]
    return errors[0] if errors else f"retval {result.retval}, errno {result.errnoval}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def save_domain(
    hv: Hypervisor, name: str, path: Path, keep_running: bool = False
) -> SaveReport:
    """Save a domain to an xl-format file; destroy it afterwards unless ``keep_running``."""
    info = hv.lookup(name)
    if info.state != "running":
        raise SaveRestoreError(f"domain {info.name} is {info.state}: only a running one saves")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    suspended = False

    async def suspend() -> int:
        nonlocal suspended
        await hv.suspend(info.domid)
        suspended = True
        return 1

    async def logdirty(domid: int, enable: int) -> int:
        await hv.switch_logdirty(domid, bool(enable))
        return 0

    try:
        header = xl.SavefileHeader(_config_json(info))
        _write_all(fd, header.encode() + libxl.Header().encode() + libxl.LIBXC_CONTEXT_RECORD)
        session = HelperSession(
            Mode.SAVE, Callbacks(suspend=suspend, switch_qemu_logdirty=logdirty)
        )
        # `xl save` is not live: the guest is suspended once and every page sent
        args = SaveArgs(info.domid, session.cbflags, StreamType.PLAIN, flags=0)
        result = await session.run(fd, -1, args, extra_env=hv.helper_env())
        if not result.ok:
            raise SaveRestoreError(f"save of {info.name} failed: {_helper_error(result)}")
        _write_all(fd, libxl.END_RECORD)
        os.fsync(fd)
        size = os.fstat(fd).st_size
    except (HelperFailed, SaveRestoreError, OSError, HypervisorError) as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        if suspended:  # as xl does when a save fails: the guest carries on
            await hv.resume(info.domid)
        if isinstance(exc, SaveRestoreError):
            raise
        raise SaveRestoreError(f"save of {info.name} failed: {exc}") from exc
    os.close(fd)
    if keep_running:
        await hv.resume(info.domid)
    else:
        hv.destroy(info.domid)
    return SaveReport(path, size, result)


def _config_json(info: DomainInfo) -> bytes:
    return json.dumps(info.config, sort_keys=True).encode()


async def restore_domain(hv: Hypervisor, path: Path, name: str | None = None) -> DomainInfo:
    """Restore an xl-format file; the domain runs afterwards."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            # a file can be checked whole first: a bad one then creates no domain at all
            with io.FileIO(os.dup(fd), "rb") as f:
                verify_file(f, StreamDecoder(None))
            os.lseek(fd, 0, os.SEEK_SET)  # the dup shares the offset
        return await _restore_fd(hv, fd, name)
    except StreamError as exc:
        raise SaveRestoreError(f"{path}: {exc}") from None
    finally:
        os.close(fd)


async def _restore_fd(hv: Hypervisor, fd: int, name: str | None) -> DomainInfo:
    decoder = StreamDecoder(None)
    config: dict[str, Any] | None = None
    with io.FileIO(fd, "rb", closefd=False) as f:
        for event in iter_events(f, decoder, reuse_buffer=False, read_ahead=False):
            if isinstance(event, XlHeader):
                config = json.loads(event.header.config)
            elif isinstance(event, Record) and event.rtype == libxl.RecType.LIBXC_CONTEXT:
                break
            elif isinstance(event, StreamEnd):
                raise SaveRestoreError("stream ended before LIBXC_CONTEXT")
        if config is None:
            raise SaveRestoreError("not an xl savefile: no xl header with the domain config")
        c_info = config.get("c_info")
        cfg_name = str(c_info.get("name", "restored")) if isinstance(c_info, dict) else "restored"
        target = hv.create_restore_target(config, name or cfg_name)
        try:
            session = HelperSession(Mode.RESTORE, Callbacks(static_data_done=_zero))
            args = RestoreArgs(target.domid, session.cbflags, StreamType.PLAIN)
            result = await session.run(fd, -1, args, extra_env=hv.helper_env())
            if not result.ok:
                raise SaveRestoreError(f"restore failed: {_helper_error(result)}")
            decoder.skip_libxc(os.lseek(fd, 0, os.SEEK_CUR))
            for event in iter_events(f, decoder, reuse_buffer=False, read_ahead=False):
                if isinstance(event, Record):
                    event.decode()  # emulator records: none for simulated PV domains
                    if event.rtype == libxl.RecType.END:
                        break
                elif isinstance(event, StreamEnd):
                    break
            return await hv.finish_restore(target.domid)
        except BaseException:
            hv.destroy(target.domid)
            raise


async def _zero(_missing: int) -> int:
    return 0


__all__ = ["SaveReport", "SaveRestoreError", "restore_domain", "save_domain"]
