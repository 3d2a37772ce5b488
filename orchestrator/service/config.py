"""remusd's configuration: a TOML file, every key overridable on the command line.

Validation is strict and names the key: an unknown key, a value of the wrong
type or out of range is a :class:`ConfigError` such as
``replication.listen: expected HOST:PORT, got 'x'``, never a traceback and
never silently ignored (a typo in a safety setting must not pass).

    [api]
    socket = "/run/remus/remusd.sock"   # unix socket, mode 0600
    tcp = ""                            # "ADDR:PORT" to listen on TCP too
    tls_cert = ""                       # PEM; TCP off loopback requires TLS
    tls_key = ""
    token_file = ""                     # bearer token required on TCP

    [replication]
    listen = "0.0.0.0:8002"             # where peers' primaries connect
    interval_ms = 200                   # default checkpoint interval
    heartbeat_interval_ms = 50
    heartbeat_timeout_ms = 300          # also the secondaries' (they learn the rest)
    ack_timeout_ms = 5000
    insecure = false                    # true: plain TCP (default: mutual TLS, pinned peers)

    [witness]
    url = ""                            # file:///DIR or etcd3+http(s)://HOST:PORT (issue 22)
    lease_ttl_ms = 3000                 # the secondary takes over no sooner after a loss

The ``[replication]`` durations and the ``[witness]`` are the defaults of a protection's settings
(:class:`~orchestrator.protection.spec.ProtectionSpec`), checked against the
same bounds as the API's and the CLI's. So is ``[witness] url``, at start: a
scheme tooz would not open as a witness, or a relative file URL, stops remusd
with the key named rather than failing every protection later.

    [metrics]
    listen = "127.0.0.1:9102"           # "" for none; also served on the API

    [state]
    dir = "/var/lib/remus"              # registry.sqlite, worker status files
    host = ""                           # simulated host dir (embedded default)
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, get_type_hints

from ..protection.spec import ProtectionSpec, SpecError

DEFAULT_PATH: Final = Path("/etc/remus/remusd.toml")


class ConfigError(ValueError):
    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        super().__init__(f"{key}: {problem}")


@dataclass(frozen=True)
class ApiConfig:
    socket: str = "/run/remus/remusd.sock"
    tcp: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    token_file: str = ""


@dataclass(frozen=True)
class ReplicationConfig:
    listen: str = "0.0.0.0:8002"
    interval_ms: int = 200
    heartbeat_interval_ms: int = 50
    heartbeat_timeout_ms: int = 300
    ack_timeout_ms: int = 5000
    # plain TCP for every replication connection, both ways (`--insecure-link`)
    insecure: bool = False


@dataclass(frozen=True)
class WitnessConfig:
    # as tooz spells it: file:///DIR or etcd3+http(s)://HOST:PORT (the spec checks it
    # at start); "": the backend's own; "none" (with unsafe): none, and a secondary
    # takes over on heartbeats alone, which a partition turns into two copies
    url: str = ""
    lease_ttl_ms: int = 3000


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9102"


@dataclass(frozen=True)
class StateConfig:
    dir: str = "/var/lib/remus"
    host: str = ""


@dataclass(frozen=True)
class Config:
    api: ApiConfig = field(default_factory=ApiConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    witness: WitnessConfig = field(default_factory=WitnessConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    state: StateConfig = field(default_factory=StateConfig)

    @property
    def registry_path(self) -> Path:
        return Path(self.state.dir) / "registry.sqlite"

    @property
    def workers_dir(self) -> Path:
        return Path(self.state.dir) / "workers"

    def spec_defaults(self, name: str = "") -> ProtectionSpec:
        """A protection's settings where a request leaves them out: this host's."""
        r = self.replication
        return ProtectionSpec(
            name=name,
            interval_ms=r.interval_ms,
            heartbeat_interval_ms=r.heartbeat_interval_ms,
            heartbeat_timeout_ms=r.heartbeat_timeout_ms,
            ack_timeout_ms=r.ack_timeout_ms,
            witness=self.witness.url,
            lease_ttl_ms=self.witness.lease_ttl_ms,
            insecure_link=r.insecure,
        )


# each section's class, as Config's fields declare it
_CLASSES: Final[dict[str, type]] = get_type_hints(Config)
_SECTIONS: Final = tuple(_CLASSES)


def parse_hostport(key: str, value: str, allow_empty: bool = False) -> tuple[str, int] | None:
    if not value and allow_empty:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check(cfg: Config) -> Config:
    parse_hostport("replication.listen", cfg.replication.listen)
    parse_hostport("metrics.listen", cfg.metrics.listen, allow_empty=True)
    tcp = parse_hostport("api.tcp", cfg.api.tcp, allow_empty=True)
    try:  # the bounds are the spec's: one place says what an interval may be
        cfg.spec_defaults()
    except SpecError as exc:
        section = "witness" if exc.field in ("witness", "lease_ttl_ms") else "replication"
        key = "url" if exc.field == "witness" else exc.field
        raise ConfigError(f"{section}.{key}", str(exc).split(": ", 1)[1]) from None
    if not cfg.api.socket:
        raise ConfigError("api.socket", "must not be empty")
    if bool(cfg.api.tls_cert) != bool(cfg.api.tls_key):
        raise ConfigError("api.tls_key", "tls_cert and tls_key go together")
    if tcp is not None:
        if not cfg.api.token_file:
            raise ConfigError("api.token_file", "a TCP listener needs a bearer token")
        if not _is_loopback(tcp[0]) and not cfg.api.tls_cert:
            raise ConfigError("api.tls_cert", "a TCP listener off loopback needs TLS")
    for key in ("api.tls_cert", "api.tls_key", "api.token_file"):
        section, name = key.split(".")
        path = getattr(getattr(cfg, section), name)
        if path and not Path(path).is_file():
            raise ConfigError(key, f"no such file: {path}")
    return cfg


def _section(name: str, raw: Any) -> Any:
    cls = _CLASSES[name]
    if not isinstance(raw, dict):
        raise ConfigError(name, "must be a table")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        f = known.get(key)
        if f is None:
            raise ConfigError(f"{name}.{key}", f"unknown key (known: {', '.join(known)})")
        want = {"int": int, "bool": bool}.get(str(f.type), str)
        # bool is an int in Python: refuse it where a number is meant
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(
                f"{name}.{key}", f"expected {want.__name__}, got {type(value).__name__}"
            )
        values[key] = value
    return cls(**values)


def load(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """The file (if any; the default path may be absent), then ``section.key`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            if path != DEFAULT_PATH:
                raise ConfigError("config", f"no such file: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{path}: {exc}") from None
    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(key, f"unknown section (known: {', '.join(_SECTIONS)})")
    for dotted, value in (overrides or {}).items():
        section, _, name = dotted.partition(".")
        if section not in _SECTIONS or not name:
            raise ConfigError(dotted, "overrides are section.key")
        known = {f.name: f for f in fields(_CLASSES[section])}
        if name in known and known[name].type in ("int", int) and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(dotted, f"expected int, got {value!r}") from None
        if name in known and known[name].type == "bool" and isinstance(value, str):
            if value not in ("true", "false"):
                raise ConfigError(dotted, f"expected true or false, got {value!r}")
            value = value == "true"
        raw.setdefault(section, {})[name] = value
    cfg = Config(**{name: _section(name, raw.get(name, {})) for name in _SECTIONS})
    return _check(cfg)
