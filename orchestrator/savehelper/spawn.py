"""Finding and starting `libxl-save-helper` the way libxl does (protocol notes 1.1-1.5)."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Final

HELPER_NAME: Final = "libxl-save-helper"
# Debian puts it in /usr/lib/xen-<version>/bin; upstream in <libexecdir>/xen/bin.
SEARCH_GLOBS: Final = (
    "/usr/lib/xen-*/bin/libxl-save-helper",
    "/usr/libexec/xen/bin/libxl-save-helper",
    "/usr/lib/xen/bin/libxl-save-helper",
    "/usr/local/lib/xen/bin/libxl-save-helper",
)


class HelperNotFound(Exception):
    pass


class Mode(Enum):
    SAVE = "--save-domain"
    RESTORE = "--restore-domain"


class StreamType(IntEnum):
    """xc_stream_type_t (and libxl_checkpointed_stream): the helper's last argument."""

    PLAIN = 0
    REMUS = 1
    COLO = 2


XCFLAGS_LIVE: Final = 1
XCFLAGS_DEBUG: Final = 2


@dataclass(frozen=True, slots=True)
class SaveArgs:
    domid: int
    cbflags: int
    stream_type: StreamType = StreamType.PLAIN
    flags: int = XCFLAGS_LIVE

    def words(self, io_fd: int, back_fd: int) -> list[str]:
        return [
            str(io_fd),
            str(back_fd),
            str(self.domid),
            str(self.flags),
            str(self.cbflags),
            str(int(self.stream_type)),
        ]


@dataclass(frozen=True, slots=True)
class RestoreArgs:
    domid: int
    cbflags: int
    stream_type: StreamType = StreamType.PLAIN
    store_evtchn: int = 0
    store_domid: int = 0
    console_evtchn: int = 0
    console_domid: int = 0

    def words(self, io_fd: int, back_fd: int) -> list[str]:
        return [
            str(io_fd),
            str(back_fd),
            str(self.domid),
            str(self.store_evtchn),
            str(self.store_domid),
            str(self.console_evtchn),
            str(self.console_domid),
            str(self.cbflags),
            str(int(self.stream_type)),
        ]


def find_helper(env: Mapping[str, str] | None = None) -> str:
    """``$LIBXL_SAVE_HELPER`` if set (as libxl: even to a bare name, searched in PATH),
    else the installed Xen's helper."""
    env = os.environ if env is None else env
    chosen = env.get("LIBXL_SAVE_HELPER")
    if chosen is not None:
        if "/" in chosen:
            if not os.access(chosen, os.X_OK):
                raise HelperNotFound(f"LIBXL_SAVE_HELPER={chosen!r} is not an executable file")
            return chosen
        found = shutil.which(chosen, path=env.get("PATH"))
        if not found:
            raise HelperNotFound(f"LIBXL_SAVE_HELPER={chosen!r} is not in PATH")
        return found
    for pattern in SEARCH_GLOBS:
        for path in sorted(glob.glob(pattern), reverse=True):
            if os.access(path, os.X_OK):
                return path
    raise HelperNotFound(
        "no libxl-save-helper found: install Xen's tools (Debian: apt-get install "
        "xen-utils-4.17) or set LIBXL_SAVE_HELPER=remus-sim-save-helper for the "
        "simulated hypervisor"
    )


def _child_fd(fd: int, owned: list[int]) -> int:
    """libxl's treatment of the stream and back-channel fds before exec.

    fds 0-2 become the helper's message pipes and stderr, so a caller's fd
    in that range is dup()ed to a free number first. The helper's libxc
    retries only EINTR, so the fd must be blocking: O_NONBLOCK lives on the
    shared open file description, so this affects our copy too. Close-on-exec
    is cleared for the child by passing the fd in ``pass_fds``.
    """
    if fd < 0:
        return -1
    if fd <= 2:
        fd = os.dup(fd)
        owned.append(fd)
    os.set_blocking(fd, True)
    return fd


@dataclass
class SpawnedHelper:
    process: asyncio.subprocess.Process
    argv: list[str]
    io_fd: int
    back_fd: int
    messages_fd: int  # our read end of the helper's stdout
    replies_fd: int  # our write end of the helper's stdin
    _owned: list[int]

    def close_replies(self) -> None:
        """Close the helper's stdin: a helper waiting for a reply then exits 254."""
        if self.replies_fd >= 0:
            os.close(self.replies_fd)
            self.replies_fd = -1

    def close_parent_copies(self) -> None:
        """Close the dups made for the child and our pipe ends; the caller's fds stay."""
        self.close_replies()
        if self.messages_fd >= 0:
            os.close(self.messages_fd)
            self.messages_fd = -1
        for fd in self._owned:
            os.close(fd)
        self._owned.clear()


async def spawn_helper(
    mode: Mode,
    stream_fd: int,
    back_fd: int,
    args: SaveArgs | RestoreArgs,
    *,
    helper: str | None = None,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> SpawnedHelper:
    """Start the helper: stdin/stdout/stderr are pipes; only the two stream fds pass.

    The message pipes are raw fds of ours (not asyncio streams) so that the
    session can answer a callback in the same event-loop turn that read it.
    """
    child_env = dict(os.environ if env is None else env)
    if extra_env:
        child_env.update(extra_env)
    path = helper or find_helper(child_env)
    owned: list[int] = []
    io_fd = _child_fd(stream_fd, owned)
    bk_fd = _child_fd(back_fd, owned)
    argv = list(argv_for(path, mode, io_fd, bk_fd, args))
    replies_r, replies_w = os.pipe()
    messages_r, messages_w = os.pipe()
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=replies_r,
            stdout=messages_w,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=tuple(fd for fd in (io_fd, bk_fd) if fd >= 0),
            close_fds=True,
            env=child_env,
            # libxl resets SIGPIPE to default in the child (libxl_exec.c)
            restore_signals=True,
        )
    except BaseException:
        for fd in (*owned, replies_w, messages_r):
            os.close(fd)
        raise
    finally:
        os.close(replies_r)
        os.close(messages_w)
    return SpawnedHelper(process, argv, io_fd, bk_fd, messages_r, replies_w, owned)


def argv_for(
    path: str, mode: Mode, io_fd: int, back_fd: int, args: SaveArgs | RestoreArgs
) -> Sequence[str]:
    return [path, mode.value, *args.words(io_fd, back_fd)]
