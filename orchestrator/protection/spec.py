"""What a protection is asked to do: every setting once, with its unit and its default.

``ProtectionSpec`` is the one form a protection's settings take. The
`remusctl protect` options (:func:`add_arguments`, :meth:`ProtectionSpec.from_args`),
remusd's API schema (:func:`api_schema`, :meth:`ProtectionSpec.from_api`), the
registry row and the worker's input (:meth:`ProtectionSpec.to_json` /
:meth:`ProtectionSpec.from_json`) are all derived from :data:`FIELDS` below,
so a setting's name, unit, bounds and default are written in one place.

Durations are integer or float milliseconds everywhere a person or a program
sees them (the flags, the API, the JSON); the drivers read them in seconds
through the ``*_s`` properties, so no caller converts units itself.
"""

from __future__ import annotations

import argparse
import json
import math
import urllib.parse
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum, StrEnum
from typing import Any, Final

from ..coordination.witness import ETCD_SCHEMES, FILE_SCHEMES
from ..transport.sshtarget import parse_target


class Mode(StrEnum):
    REMUS = "remus"  # checkpoints every interval, output held until the ACK
    COLO = "colo"  # both copies run, checkpoints when their output differs


class Netbuf(StrEnum):
    """How a Remus primary holds the guest's output until the checkpoint's ACK."""

    AUTO = "auto"  # plug where the kernel has sch_plug, else nfqueue, else proxy
    PLUG = "plug"  # Xen's own: the plug qdisc
    NFQUEUE = "nfqueue"  # NFQUEUE on the guest's vif (root)
    PROXY = "proxy"  # a userspace proxy that clients connect through


@dataclass(frozen=True)
class Field:
    """One setting: its JSON/API name, unit, bounds, flag and help."""

    name: str
    kind: type  # int, float, bool, str, Mode or Netbuf
    unit: str = ""  # "ms", or "" for none
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    flags: tuple[str, ...] = ()  # remusctl protect's option strings ((): not a flag)
    api: bool = True  # settable through remusd's POST /v1/protections
    help: str = ""
    metavar: str = ""  # the flag's value in --help ("": the name's)


# The table every form is derived from. Order is the order of --help and the schema.
FIELDS: Final[tuple[Field, ...]] = (
    Field("name", str, help="the domain to protect"),
    Field("peer", str, flags=("--to",), help="HOST[:PORT] of the secondary's receiver"),
    Field(
        "ssh",
        str,
        flags=("--ssh",),
        metavar="[USER@]HOST[:PORT]",
        help="instead of --to: start `remusctl receive --stdio` on HOST over SSH (as xl "
        "remus does) and replicate over the session; its host key must be in known_hosts",
    ),
    Field(
        "ssh_known_hosts",
        str,
        flags=("--ssh-known-hosts",),
        metavar="FILE",
        help="--ssh: a known_hosts file read besides ~/.ssh/known_hosts and "
        "/etc/ssh/ssh_known_hosts (an unknown host key is refused)",
    ),
    Field(
        "ssh_identity",
        str,
        flags=("--ssh-identity",),
        metavar="FILE",
        help="--ssh: a private key to log in with, besides the agent's and ~/.ssh/id_*",
    ),
    Field(
        "mode",
        Mode,
        flags=("--mode",),
        help="remus: checkpoints every interval; colo: both copies run, checkpoints "
        "when their output differs",
    ),
    Field(
        "interval_ms",
        int,
        "ms",
        0,
        60_000,
        flags=("-i",),
        help="checkpoint interval: a checkpoint every MS, the time one takes included",
    ),
    Field(
        "heartbeat_interval_ms",
        int,
        "ms",
        1,
        60_000,
        flags=("--heartbeat-interval",),
        help="how often each side tells the other it is alive",
    ),
    Field(
        "heartbeat_timeout_ms",
        int,
        "ms",
        10,
        600_000,
        flags=("--heartbeat-timeout",),
        help="the secondary takes over after this long without a word from the primary "
        "(under emulation, seconds)",
    ),
    Field(
        "ack_timeout_ms",
        int,
        "ms",
        10,
        600_000,
        flags=("--ack-timeout",),
        help="a checkpoint not ACKed within this ends replication",
    ),
    Field(
        "netbuf",
        Netbuf,
        flags=("--netbuf",),
        help="output buffer: a plug qdisc (Xen's way; needs sch_plug) or NFQUEUE on the "
        "guest's vif (root), or a userspace proxy clients connect through (its address in "
        "`remusctl status`); auto takes the first that works",
    ),
    Field(
        "no_netbuf",
        bool,
        flags=("-n",),
        help="Remus: no network buffering; COLO: output is not compared (unsafe)",
    ),
    Field(
        "no_disk",
        bool,
        flags=("-d",),
        help="Remus: no disk replication (unsafe). COLO never replicates the disk: "
        "accepted and ignored",
    ),
    Field("unsafe", bool, flags=("-F",), help="allow the unsafe switches (-n, -d, -b)"),
    Field(
        "blackhole",
        bool,
        flags=("-b",),
        api=False,
        help="replicate to /dev/null: no secondary (debugging, measuring)",
    ),
    Field(
        "checkpoint_max_interval_ms",
        int,
        "ms",
        1,
        3_600_000,
        flags=("--checkpoint-max-interval",),
        help="COLO: at most this long between checkpoints",
    ),
    Field(
        "compare_timeout_ms",
        float,
        "ms",
        0,
        60_000,
        exclusive_minimum=True,
        flags=("--compare-timeout",),
        help="COLO: output held this long for the secondary's asks for a checkpoint",
    ),
    Field(
        "witness",
        str,
        flags=("--witness",),
        help="the witness as tooz spells it (file:///DIR, etcd3+http://HOST:PORT): only the "
        "lease holder runs the guest and releases its output. Default: the backend's own "
        "(the simulated hosts of one machine share a directory; Xen has none); a receiver "
        "without one uses the primary's. none (with -F): no witness, and a partition can "
        "leave two copies running",
    ),
    Field(
        "lease_ttl_ms",
        int,
        "ms",
        1000,
        60_000,
        flags=("--lease-ttl",),
        help="how long the lease outlives its last renewal; the secondary takes over no "
        "sooner than this after the primary stopped renewing",
    ),
    Field(
        "insecure_link",
        bool,
        flags=("--insecure-link",),
        help="plain TCP for the replication link: no TLS, no authentication of the peer, "
        "the guest's memory in clear (the default is mutual TLS between pinned hosts)",
    ),
    Field(
        "verify_memory",
        bool,
        flags=("--verify-memory",),
        api=False,
        help="COLO: compare a digest of both memories at every checkpoint (tests, audits)",
    ),
)
_BY_NAME: Final = {f.name: f for f in FIELDS}
NO_WITNESS: Final = "none"  # --witness none: no witness at all (unsafe: needs -F)


class SpecError(ValueError):
    """A setting that is missing, of the wrong type, or out of its bounds."""

    def __init__(self, name: str, message: str) -> None:
        self.field = name
        super().__init__(f"{name}: {message}")


@dataclass(frozen=True)
class ProtectionSpec:
    name: str
    peer: str = ""
    mode: Mode = Mode.REMUS
    interval_ms: int = 200  # xl remus -i, default 200 ms
    heartbeat_interval_ms: int = 50
    heartbeat_timeout_ms: int = 300
    ack_timeout_ms: int = 5000
    netbuf: Netbuf = Netbuf.AUTO
    no_netbuf: bool = False
    no_disk: bool = False
    unsafe: bool = False
    blackhole: bool = False
    # QEMU's x-checkpoint-delay; libxl's COLO_PROXY_CHECKPOINT_TIMEOUT is 5 s
    checkpoint_max_interval_ms: int = 5000
    # QEMU's colo-compare compare_timeout is 3 s; here the guests answer in
    # milliseconds, so a slow secondary costs one checkpoint, not 3 s
    compare_timeout_ms: float = 100.0
    witness: str = ""
    lease_ttl_ms: int = 3000
    verify_memory: bool = False
    insecure_link: bool = False
    ssh: str = ""  # [USER@]HOST[:PORT]: the receiver is started there over SSH
    ssh_known_hosts: str = ""
    ssh_identity: str = ""

    def __post_init__(self) -> None:
        for f in FIELDS:
            _check(f, getattr(self, f.name))
        _check_witness(self.witness)
        _check_ssh(self)

    # -- seconds, for the drivers -------------------------------------------------------

    @property
    def target(self) -> str:
        """Where the guest is protected to, as people read it: the peer's address, or
        the SSH target the receiver is started on."""
        return self.peer or self.ssh

    @property
    def interval_s(self) -> float:
        return self.interval_ms / 1e3

    @property
    def heartbeat_interval_s(self) -> float:
        return self.heartbeat_interval_ms / 1e3

    @property
    def heartbeat_timeout_s(self) -> float:
        return self.heartbeat_timeout_ms / 1e3

    @property
    def ack_timeout_s(self) -> float:
        return self.ack_timeout_ms / 1e3

    @property
    def checkpoint_max_interval_s(self) -> float:
        return self.checkpoint_max_interval_ms / 1e3

    @property
    def compare_timeout_s(self) -> float:
        return self.compare_timeout_ms / 1e3

    @property
    def lease_ttl_s(self) -> float:
        return self.lease_ttl_ms / 1e3

    # Lease margins, as fractions of the TTL: renewals go every TTL/3, so the
    # validity left on a healthy lease stays near 2/3 of it or above.
    @property
    def lease_release_margin_s(self) -> float:
        """Output goes only if the lease stays valid this much past the release."""
        return self.lease_ttl_s / 6

    @property
    def lease_fence_margin_s(self) -> float:
        """A primary not sure to hold the lease this far ahead fences itself."""
        return self.lease_ttl_s / 3

    @property
    def takeover_window_s(self) -> float:
        """How long a secondary that lost the primary tries to take the lease: the
        TTL (the primary's last renewal may just have been granted), and a margin
        for the witness's own expiry check."""
        return self.lease_ttl_s * 1.5 + 1.0

    @property
    def colo(self) -> bool:
        return self.mode is Mode.COLO

    @property
    def replicates_disk(self) -> bool:
        """COLO's secondary copy writes a disk of its own; Remus replicates unless -d."""
        return not self.colo and not self.no_disk and not self.blackhole

    def unsafe_flags(self) -> list[str]:
        """The unsafe switches asked for (COLO never replicates the disk, so -d asks
        for nothing unsafe there)."""
        on = (
            ("-b", self.blackhole),
            ("-n", self.no_netbuf),
            ("-d", self.no_disk and not self.colo),
            ("--witness none", self.witness == NO_WITNESS),
        )
        return [flag for flag, asked in on if asked]

    def with_(self, **changes: Any) -> ProtectionSpec:
        return replace(self, **changes)

    # -- the forms it takes -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mode"], d["netbuf"] = self.mode.value, self.netbuf.value
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], defaults: ProtectionSpec | None = None
    ) -> ProtectionSpec:
        """From a JSON object: unknown keys and wrong types are :class:`SpecError`."""
        if not isinstance(data, dict):
            raise SpecError("spec", "is not an object")
        unknown = sorted(set(data) - set(_BY_NAME))
        if unknown:
            raise SpecError(unknown[0], "is not a setting")
        if "name" not in data and defaults is None:
            raise SpecError("name", "is required")
        values: dict[str, Any] = {}
        for key, raw in data.items():
            values[key] = _coerce(_BY_NAME[key], raw)
        base = defaults if defaults is not None else cls(name=values["name"])
        return replace(base, **values)

    @classmethod
    def from_json(cls, text: str) -> ProtectionSpec:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SpecError("spec", f"is not JSON: {exc}") from None
        spec: ProtectionSpec = cls.from_dict(data)
        return spec

    @classmethod
    def from_api(cls, body: dict[str, Any], defaults: ProtectionSpec) -> ProtectionSpec:
        """A POST body (already schema-checked) over the daemon's configured defaults."""
        hidden = [k for k in body if k in _BY_NAME and not _BY_NAME[k].api]
        if hidden:
            raise SpecError(hidden[0], "cannot be set through the API")
        spec: ProtectionSpec = cls.from_dict(body, replace(defaults, name=str(body.get("name"))))
        return spec

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ProtectionSpec:
        values = {
            f.name: getattr(args, f.name) for f in FIELDS if getattr(args, f.name, None) is not None
        }
        if getattr(args, "colo", False):  # --colo is --mode colo
            values["mode"] = Mode.COLO
        spec: ProtectionSpec = cls.from_dict(values)
        return spec


def _check(f: Field, value: Any) -> None:
    if f.kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f.name, f"{value!r} is not a number")
        if not math.isfinite(value):
            raise SpecError(f.name, f"{value!r} is not a finite number")
        if f.kind is int and value != int(value):
            raise SpecError(f.name, f"{value!r} is not an integer")
        if f.minimum is not None and (
            value <= f.minimum if f.exclusive_minimum else value < f.minimum
        ):
            raise SpecError(f.name, f"{value:g} {f.unit} is below {f.minimum:g}".replace("  ", " "))
        if f.maximum is not None and value > f.maximum:
            raise SpecError(f.name, f"{value:g} {f.unit} is above {f.maximum:g}".replace("  ", " "))
    elif f.kind is bool:
        if not isinstance(value, bool):
            raise SpecError(f.name, f"{value!r} is not true or false")
    elif f.kind is str:
        if not isinstance(value, str):
            raise SpecError(f.name, f"{value!r} is not a string")
    elif not isinstance(value, f.kind):
        raise SpecError(f.name, f"{value!r} is not one of {_choices(f)}")


def _check_witness(url: str) -> None:
    """The URL forms tooz's drivers take here, checked before anything connects."""
    if url in ("", NO_WITNESS):
        return
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in FILE_SCHEMES:
        if parts.netloc or not parts.path.startswith("/"):
            raise SpecError("witness", f"{url!r}: a file witness is file:///ABSOLUTE/DIR")
    elif parts.scheme in ETCD_SCHEMES:
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise SpecError("witness", f"{url!r}: an etcd witness is {parts.scheme}://HOST:PORT")
    else:
        raise SpecError(
            "witness",
            f"{url!r}: unknown scheme {parts.scheme!r}; use file:///DIR, "
            "etcd3+http://HOST:PORT or etcd3+https://HOST:PORT (or none, with -F)",
        )


def _check_ssh(spec: ProtectionSpec) -> None:
    """``--ssh``'s target parses, and it is the only way to the peer asked for."""
    if not spec.ssh:  # ssh_known_hosts and ssh_identity alone: nothing reads them
        return
    try:
        parse_target(spec.ssh)
    except ValueError as exc:
        raise SpecError("ssh", str(exc)) from None
    if spec.peer:
        raise SpecError("ssh", "reaches the peer itself: give ssh or peer (--to), not both")
    if spec.blackhole:
        raise SpecError("ssh", "has no peer to reach with blackhole (-b)")


def _coerce(f: Field, raw: Any) -> Any:
    """A JSON value into the field's type (JSON Schema 2020-12: 5.0 is an integer)."""
    if f.kind is int and isinstance(raw, float) and not isinstance(raw, bool) and raw.is_integer():
        return int(raw)
    if f.kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if f.kind in (Mode, Netbuf) and isinstance(raw, str):
        try:
            return f.kind(raw)
        except ValueError:
            raise SpecError(f.name, f"{raw!r} is not one of {_choices(f)}") from None
    return raw


def _choices(f: Field) -> str:
    return ", ".join(m.value for m in f.kind)  # type: ignore[attr-defined]


def _default(f: Field) -> Any:
    for df in fields(ProtectionSpec):
        if df.name == f.name:
            return df.default
    raise KeyError(f.name)


def api_schema() -> dict[str, Any]:
    """The JSON Schema of POST /v1/protections, from :data:`FIELDS`."""
    props: dict[str, Any] = {}
    for f in FIELDS:
        if not f.api:
            continue
        p: dict[str, Any] = {}
        if f.kind is int:
            p["type"] = "integer"
        elif f.kind is float:
            p["type"] = "number"
        elif f.kind is bool:
            p["type"] = "boolean"
        elif f.kind is str:
            p["type"] = "string"
        else:
            p.update(type="string", enum=[m.value for m in f.kind])  # type: ignore[attr-defined]
        if f.minimum is not None:
            p["exclusiveMinimum" if f.exclusive_minimum else "minimum"] = f.minimum
        if f.maximum is not None:
            p["maximum"] = f.maximum
        if f.name == "name":
            p.update(minLength=1, maxLength=64, pattern="^[A-Za-z0-9_.-]+$")
        elif f.name in ("peer", "ssh"):
            p.update(minLength=1, maxLength=255)
        else:
            d = _default(f)
            p["default"] = d.value if isinstance(d, Enum) else d
        p["description"] = f.help + (f" ({f.unit})" if f.unit else "")
        props[f.name] = p
    return {
        "type": "object",
        "required": ["name"],
        # peer, unless ssh reaches the peer instead: "peer is required" is still the
        # error without either (an anyOf would only say the body matches neither)
        "if": {"not": {"required": ["ssh"]}},
        "then": {"required": ["peer"]},
        "additionalProperties": False,
        "properties": props,
    }


def add_arguments(parser: argparse.ArgumentParser, *, exclude: tuple[str, ...] = ()) -> None:
    """`remusctl protect`'s setting options. Defaults are None, so that only what was
    given overrides the spec's (or remusd's) defaults."""
    for f in FIELDS:
        if not f.flags or f.name in exclude:
            continue
        d = _default(f)
        shown = d.value if isinstance(d, Enum) else d
        text = f.help
        if f.kind is not bool and shown != "":  # a switch is off unless given
            text += f" (default {shown}{' ' + f.unit if f.unit else ''})"
        if f.kind is bool:
            parser.add_argument(
                *f.flags, dest=f.name, action="store_const", const=True, default=None, help=text
            )
        elif f.kind in (int, float):
            parser.add_argument(
                *f.flags,
                dest=f.name,
                type=f.kind,
                default=None,
                metavar=f.unit.upper() or "N",
                help=text,
            )
        elif f.kind is str:
            parser.add_argument(
                *f.flags, dest=f.name, default=None, metavar=f.metavar or None, help=text
            )
        else:
            parser.add_argument(
                *f.flags,
                dest=f.name,
                choices=[m.value for m in f.kind],  # type: ignore[attr-defined]
                default=None,
                help=text,
            )
