"""`remusctl`: the command-line front end.

Exit statuses: 0 ok, 1 the stream (or operation) is bad, 2 usage or I/O error.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from .apicmds import (
    add_client_options,
    api_events,
    api_failover,
    api_host_info,
    api_pause,
    api_protect,
    api_status,
    api_switchover,
    api_unprotect,
    run_api,
    status_table,
    table,
)
from .demo import main as demo_main
from .hypervisors.base import Hypervisor, HypervisorError
from .hypervisors.select import BACKENDS, open_hypervisor
from .hypervisors.sim import SimHypervisor
from .protection.host import LinkError, check_peer, identity_facts, tls_identity
from .protection.remote import RECEIVER_FIELDS, receive_command
from .protection.runner import run_primary, run_secondary, run_secondary_stdio
from .protection.session import ReplicationError, Unprotected
from .protection.spec import FIELDS, NO_WITNESS, Mode, ProtectionSpec, SpecError, add_arguments
from .protection.status import ProtectionStatus, Role, State
from .saverestore import SaveRestoreError, restore_domain, save_domain
from .streams import Layer, StreamDecoder, StreamError, StreamType, libxc
from .streams.dump import dump_lines
from .streams.fileio import open_input, verify_file
from .streams.synth import SynthSpec, generate, write_all


def _decoder(args: argparse.Namespace) -> StreamDecoder:
    layer = None if args.layer == "auto" else Layer(args.layer)
    return StreamDecoder(layer, StreamType(args.stream_type))


def cmd_stream_verify(args: argparse.Namespace) -> int:
    with open_input(args.file) as f:
        try:
            summary = verify_file(f, _decoder(args))
        except StreamError as exc:
            if args.json:
                print(json.dumps({"ok": False, "error": str(exc), "offset": exc.offset}))
            else:
                print(f"{args.file}: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps({"ok": True, **summary.as_dict()}, indent=2))
    else:
        print(f"{args.file}: OK")
        print(summary.render())
    return 0


def cmd_stream_dump(args: argparse.Namespace) -> int:
    with open_input(args.file) as f:
        try:
            for line in dump_lines(f, _decoder(args)):
                print(line)
        except StreamError as exc:
            sys.stdout.flush()
            print(f"{args.file}: {exc}", file=sys.stderr)
            return 1
        except BrokenPipeError:
            return 0
    return 0


def cmd_stream_generate(args: argparse.Namespace) -> int:
    spec = SynthSpec(
        domain_type=libxc.DomainType.X86_PV if args.domain == "pv" else libxc.DomainType.X86_HVM,
        pages=args.pages,
        stream_type=StreamType(args.stream_type),
        checkpoints=args.checkpoints,
        dirty_pages=args.dirty_pages,
        top_layer=Layer(args.layer),
    )
    out = sys.stdout.buffer if args.file == "-" else open(args.file, "wb")  # noqa: SIM115
    with out:
        n = write_all(out, generate(spec))
    if args.file != "-":
        print(f"{args.file}: {n} bytes", file=sys.stderr)
    return 0


def _hypervisor(args: argparse.Namespace) -> Hypervisor:
    return open_hypervisor(args.backend, Path(args.host) if args.host else None)


def _where(hv: Hypervisor) -> str:
    return str(hv.host) if isinstance(hv, SimHypervisor) else f"this host ({hv.name})"


def _sim(args: argparse.Namespace) -> SimHypervisor:
    hv = _hypervisor(args)
    if not isinstance(hv, SimHypervisor):
        raise SystemExit(f"remusctl: {args.command} needs the simulated hypervisor (--backend sim)")
    return hv


def cmd_domain_create(args: argparse.Namespace) -> int:
    info = _sim(args).create_domain(
        args.name,
        args.memory,
        dirty_rate=args.dirty_rate,
        nondeterministic=args.nondeterministic,
    )
    print(f"domain {info.name} (domid {info.domid}) running; service at {info.address}")
    return 0


def cmd_domain_list(args: argparse.Namespace) -> int:
    domains = _hypervisor(args).list_domains()
    if args.json:
        print(json.dumps([dataclasses.asdict(d) for d in domains], indent=2))
        return 0
    rows = [
        [
            d.name,
            str(d.domid),
            d.state + (f" ({d.shutdown_reason})" if d.shutdown_reason else ""),
            str(d.memory_bytes >> 20),
            d.domain_type,
            d.address,
            d.uuid,
        ]
        for d in domains
    ]
    print(table(rows, ["NAME", "ID", "STATE", "MEM(MiB)", "TYPE", "SERVICE", "UUID"]))
    return 0


def cmd_domain_destroy(args: argparse.Namespace) -> int:
    hv = _hypervisor(args)
    hv.destroy(hv.lookup(args.name).domid)
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    hv = _hypervisor(args)
    report = asyncio.run(save_domain(hv, args.name, Path(args.file), keep_running=args.keep))
    print(f"saved {args.name} to {report.path}: {report.bytes} bytes")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    hv = _hypervisor(args)
    info = asyncio.run(restore_domain(hv, Path(args.file), args.name))
    print(f"restored {info.name} (domid {info.domid}) on {_where(hv)}; service at {info.address}")
    return 0


def _spec(args: argparse.Namespace) -> ProtectionSpec | None:
    """The one form `protect` and `receive` settings take; None (said why) if invalid."""
    try:
        return ProtectionSpec.from_args(args)
    except SpecError as exc:
        print(f"remusctl: {exc}", file=sys.stderr)
        return None


def cmd_protect(args: argparse.Namespace) -> int:
    spec = _spec(args)
    if spec is None:
        return 2
    if not args.foreground:
        if spec.verify_memory:
            # it hashes the whole memory on both hosts at every checkpoint: a test and
            # audit tool, not something remusd runs for a protection
            print(
                "remusctl: --verify-memory runs in this process: add --foreground",
                file=sys.stderr,
            )
            return 2
        if spec.blackhole or args.ssh_command is not None:
            print("remusctl: -b and -s run in this process: add --foreground", file=sys.stderr)
            return 2
        if not spec.peer and not spec.ssh:
            print(
                "remusctl: protect needs --to HOST[:PORT] or --ssh [USER@]HOST[:PORT]",
                file=sys.stderr,
            )
            return 2
        return run_api(api_protect, args)
    unsafe = spec.unsafe_flags()
    if unsafe and not spec.unsafe:
        print(
            f"remusctl: {' '.join(unsafe)} requires -F (allow unsafe), as with xl remus",
            file=sys.stderr,
        )
        return 2
    hv = _hypervisor(args)
    _warn_unsafe(spec, hv)
    if not spec.blackhole and not spec.peer and not spec.ssh:
        print(
            "remusctl: protect needs --to HOST[:PORT] or --ssh [USER@]HOST[:PORT] (or -b -F)",
            file=sys.stderr,
        )
        return 2
    if spec.ssh and args.ssh_command is not None:
        print("remusctl: -s CMD and --ssh are two ways to the peer: give one", file=sys.stderr)
        return 2
    command = None
    if args.ssh_command is not None and not spec.blackhole:
        # as xl: "CMD HOST remusctl receive --stdio", or with an empty CMD, HOST alone;
        # the receiver's own settings given here go to it by its own options, the
        # same command line --ssh runs
        receive = receive_command(spec, e=args.e)
        command = f"{args.ssh_command} {spec.peer} {receive}" if args.ssh_command else spec.peer
    elif not spec.blackhole and not spec.ssh:
        try:  # before any connect: a bad address is a usage error, not a traceback
            check_peer(spec.peer)
        except SpecError as exc:
            print(f"remusctl: {exc}", file=sys.stderr)
            return 2
    if spec.mode is Mode.COLO and not spec.no_disk:
        print(
            "remusctl: COLO replicates memory and network; the secondary copy writes a disk "
            "of its own (COLO block replication is not built): use shared-nothing guests",
            file=sys.stderr,
        )
    status = asyncio.run(run_primary(hv, spec, command=command))
    print(_ended(spec, status))
    return 0


def _warn_unsafe(spec: ProtectionSpec, hv: Hypervisor | None = None) -> None:
    if spec.witness == NO_WITNESS or (
        not spec.witness and not spec.blackhole and hv is not None and hv.default_witness() is None
    ):
        print(
            "remusctl: WARNING: no witness: the secondary takes over when the heartbeats "
            "stop, so a partition can leave two copies running and serving",
            file=sys.stderr,
        )
    colo = spec.mode is Mode.COLO
    if spec.no_netbuf:
        what = (
            "output is not compared: it leaves before the secondary's is seen"
            if colo
            else "network output is not buffered: a reply can reach a client before its "
            "state is on the secondary, and be lost on failover"
        )
        print(f"remusctl: WARNING: -n: {what}", file=sys.stderr)
    if spec.no_disk and not colo:  # COLO never replicates the disk: -d changes nothing
        print(
            "remusctl: WARNING: -d: disk writes are not replicated: after a failover the "
            "secondary's disk is older than its memory",
            file=sys.stderr,
        )
    if spec.blackhole:
        print(
            "remusctl: WARNING: -b: checkpoints go to /dev/null: there is no secondary "
            "and nothing to fail over to",
            file=sys.stderr,
        )


def _ended(spec: ProtectionSpec, st: ProtectionStatus) -> str:
    # fenced: the reason ends with what became of our copy (destroyed, or paused for
    # an administrator)
    here = {
        State.FENCED: "",
        State.UNPROTECTED: "; the domain runs on here, unprotected",
    }.get(st.state, "; the domain runs on here")
    why = f"{st.reason or 'stopped'}{here}"
    if spec.mode is not Mode.COLO:
        return f"replication of {spec.name} ended after {st.checkpoints} checkpoints: {why}"
    c = st.colo
    by = (
        f" ({c.checkpoints_by_divergence} on divergence, {c.checkpoints_by_held_output} for "
        f"output held, {c.checkpoints_by_timer} on the timer, {c.memory_verified} with "
        "equal memories)"
        if c is not None
        else ""
    )
    return f"COLO of {spec.name} ended after {st.checkpoints} checkpoints{by}: {why}"


def cmd_receive(args: argparse.Namespace) -> int:
    spec = _spec(args)
    if spec is None:
        return 2
    hv = _hypervisor(args)
    try:
        if args.stdio:
            info = asyncio.run(run_secondary_stdio(hv, spec))
        else:
            info = asyncio.run(run_secondary(hv, args.listen, spec))
    except Unprotected as exc:
        print(f"replication ended by the primary ({exc}); the secondary copy was dropped")
        return 0
    print(
        f"FAILOVER: {info.name} (domid {info.domid}) runs on {_where(hv)} from the last complete "
        f"checkpoint; service at {info.address}",
        flush=True,
    )
    return 0


def cmd_host_init(args: argparse.Namespace) -> int:
    """The host's key and self-signed certificate; run again, it shows what is there."""
    hv = _hypervisor(args)
    ident = tls_identity(hv)
    made = ident.init(args.name or os.uname().nodename)
    print(f"{'created' if made else 'exists'}: {ident.cert_path}")
    print(f"fingerprint: {ident.fingerprint}")
    return 0


def cmd_host_trust(args: argparse.Namespace) -> int:
    pin = tls_identity(_hypervisor(args)).trust(args.peer, args.peer_name)
    how = "certificate" if pin.cert_pem else "fingerprint only (its certificate is stored "
    how += "" if pin.cert_pem else "when it first connects here)"
    print(f"trusted {pin.name}: {pin.fingerprint} ({how})")
    return 0


def cmd_host_identity(args: argparse.Namespace) -> int:
    facts = identity_facts(_hypervisor(args))
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    print(f"identity:    {facts['certificate'] or 'none: run `remusctl host init`'}")
    if facts["fingerprint"]:
        print(f"fingerprint: {facts['fingerprint']}")
    for p in facts["trusted"]:
        only = "" if p["certificate"] else " (fingerprint only)"
        print(f"trusts {p['name']}: {p['fingerprint']}{only}")
    if not facts["trusted"]:
        print("trusts no peer yet: `remusctl host trust CERT_FILE|sha256:FP`")
    return 0


def _statuses(args: argparse.Namespace) -> list[ProtectionStatus]:
    """The status files of this host's --foreground protections and receivers."""
    d = _hypervisor(args).state_dir()
    found = [ProtectionStatus.read(p) for p in sorted(d.glob("*.json"))] if d.exists() else []
    name = getattr(args, "name", None)
    return [s for s in found if s is not None and (not name or s.name == name)]


def cmd_status(args: argparse.Namespace) -> int:
    if not args.local:
        return run_api(api_status, args)
    rows = [st.to_dict() for st in _statuses(args)]
    print(json.dumps(rows, indent=2) if args.json else status_table(rows))
    return 0


def _signal_protection(args: argparse.Namespace, role: Role, sig: int) -> ProtectionStatus:
    for st in _statuses(args):
        if st.role is role and st.state not in (
            State.STOPPED,
            State.FAILED_OVER,
            State.SWITCHED_OVER,
        ):
            os.kill(st.pid, sig)
            return st
    raise HypervisorError(f"no running {role.value} protection of {args.name!r} on this host")


def cmd_failover(args: argparse.Namespace) -> int:
    if not args.local:
        return run_api(api_failover, args)
    for st in _statuses(args):
        age = st.last_heartbeat_age_s
        if st.role is Role.SECONDARY and age is not None and age < 1.0 and not args.force:
            print(
                f"remusctl: the primary of {args.name} was heard {age:.3g} s ago: refusing "
                "(two copies would run); use --force if it is really gone",
                file=sys.stderr,
            )
            return 1
    _signal_protection(args, Role.SECONDARY, signal.SIGUSR1)
    return 0


def cmd_unprotect(args: argparse.Namespace) -> int:
    if not args.local:
        return run_api(api_unprotect, args)
    _signal_protection(args, Role.PRIMARY, signal.SIGTERM)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="remusctl", description=__doc__)
    p.add_argument(
        "--host",
        help="simulated host directory (default: $REMUS_SIM_HOST, else a per-user default)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="hypervisor: xen (a Xen 4.17 dom0), sim (the simulated one) or auto, the "
        "default ($REMUS_BACKEND): xen where /dev/xen/privcmd and xenstore are present",
    )
    sub = p.add_subparsers(dest="command", required=True)

    dom = sub.add_parser("domain", help="create, list and destroy domains")
    dsub = dom.add_subparsers(dest="domain_command", required=True)
    c = dsub.add_parser("create", help="create a domain running the guest key-value service")
    c.add_argument("name")
    c.add_argument("--memory", type=int, default=128, help="MiB (default 128)")
    c.add_argument("--dirty-rate", type=int, default=0, help="pages the guest dirties per second")
    c.add_argument(
        "--nondeterministic",
        type=int,
        default=0,
        metavar="N",
        help="about one PUT reply in N carries a random token (COLO divergence on demand)",
    )
    c.set_defaults(func=cmd_domain_create)
    ls = dsub.add_parser("list", help="list domains")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_domain_list)
    ds = dsub.add_parser("destroy", help="destroy a domain")
    ds.add_argument("name")
    ds.set_defaults(func=cmd_domain_destroy)

    sv = sub.add_parser("save", help="save a domain to an xl-format file (as `xl save`)")
    sv.add_argument("name")
    sv.add_argument("file")
    sv.add_argument("-c", dest="keep", action="store_true", help="leave the domain running")
    sv.set_defaults(func=cmd_save)
    rs = sub.add_parser("restore", help="restore a domain from an xl-format file")
    rs.add_argument("file")
    rs.add_argument("--name", help="restore under another name")
    rs.set_defaults(func=cmd_restore)

    pr = sub.add_parser("protect", help="replicate a domain to a secondary (Remus or COLO)")
    pr.add_argument("name")
    # every setting from the spec's table: -i, --to, --mode, -b -n -d -F, the timeouts...
    add_arguments(pr)
    pr.add_argument(
        "--colo",
        action="store_true",
        help="COLO instead of Remus (the same as --mode colo)",
    )
    pr.add_argument(
        "-s",
        dest="ssh_command",
        metavar="CMD",
        help='run the replication over `sh -c "CMD HOST remusctl receive --stdio"` '
        "(e.g. ssh), as xl remus -s; with an empty CMD, --to is the whole command",
    )
    pr.add_argument(
        "-e",
        action="store_true",
        help="passed to the remote receive, as xl: our receiver never waits in the "
        "background for the domain's death in any case",
    )
    pr.add_argument(
        "--foreground",
        action="store_true",
        help="replicate from this process (as xl remus) instead of asking remusd",
    )
    pr.add_argument("--json", action="store_true")
    add_client_options(pr)
    pr.set_defaults(func=cmd_protect)
    rc = sub.add_parser("receive", help="be the secondary of one protection")
    rc.add_argument("--listen", default="127.0.0.1:8002")
    rc.add_argument(
        "--stdio",
        action="store_true",
        help="both channels over stdin/stdout (what `protect -s` runs on this host)",
    )
    rc.add_argument("-e", action="store_true", help=argparse.SUPPRESS)
    # accepted as xl's migrate-receive does, and ignored: the primary sets the interval
    rc.add_argument("-i", dest="xl_interval", type=float, help=argparse.SUPPRESS)
    add_arguments(rc, exclude=tuple(f.name for f in FIELDS if f.name not in RECEIVER_FIELDS))
    # a receiver's spec is named "incoming" until the primary's HELLO says which domain
    rc.set_defaults(func=cmd_receive, name="incoming")
    local_help = "a --foreground protection or `receive` of this host (status files)"
    stt = sub.add_parser("status", help="state of the protections on this host")
    stt.add_argument("name", nargs="?")
    stt.add_argument("--json", action="store_true")
    stt.add_argument("--local", action="store_true", help=local_help)
    add_client_options(stt)
    stt.set_defaults(func=cmd_status)
    fo = sub.add_parser("failover", help="on the secondary: take over now")
    fo.add_argument("name")
    fo.add_argument("--force", action="store_true")
    fo.add_argument("--json", action="store_true")
    fo.add_argument("--local", action="store_true", help=local_help)
    add_client_options(fo)
    fo.set_defaults(func=cmd_failover)
    so = sub.add_parser(
        "switchover",
        help="on the primary: a planned swap of roles through remusd (a last checkpoint, "
        "its ACK, the secondary resumes the guest, this host becomes its secondary)",
    )
    so.add_argument("name")
    so.add_argument("--json", action="store_true")
    add_client_options(so)
    so.set_defaults(func=lambda a: run_api(api_switchover, a))
    up = sub.add_parser("unprotect", help="on the primary: end replication")
    up.add_argument("name")
    up.add_argument("--json", action="store_true")
    up.add_argument("--local", action="store_true", help=local_help)
    add_client_options(up)
    up.set_defaults(func=cmd_unprotect)
    for verb, text in (
        ("pause", "stop replicating but keep the protection (remusd)"),
        ("resume", "replicate a paused protection again, from a full copy (remusd)"),
    ):
        pz = sub.add_parser(verb, help=text)
        pz.add_argument("name")
        pz.add_argument("--json", action="store_true")
        add_client_options(pz)
        pz.set_defaults(func=lambda a: run_api(api_pause, a))
    ev = sub.add_parser("events", help="remusd's event log")
    ev.add_argument("--name")
    ev.add_argument("--limit", type=int, default=50)
    ev.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    ev.add_argument("--json", action="store_true")
    add_client_options(ev)
    ev.set_defaults(func=lambda a: run_api(api_events, a))
    hi = sub.add_parser("host", help="this host: backend, Xen, helper, buffering (remusd)")
    hsub = hi.add_subparsers(dest="host_command", required=True)
    hinfo = hsub.add_parser("info", help="remusd's view: backend, helper, link, pinned peers")
    hinfo.add_argument("--json", action="store_true")
    add_client_options(hinfo)
    hinfo.set_defaults(func=lambda a: run_api(api_host_info, a))
    hinit = hsub.add_parser(
        "init", help="make this host's replication key and certificate (idempotent)"
    )
    hinit.add_argument("--name", help="the certificate's common name (default: the host name)")
    hinit.set_defaults(func=cmd_host_init)
    htrust = hsub.add_parser("trust", help="pin a peer for the replication link")
    htrust.add_argument("peer", metavar="CERT_FILE|sha256:FP")
    htrust.add_argument("--name", dest="peer_name", metavar="PEER", help="what to call it")
    htrust.set_defaults(func=cmd_host_trust)
    hid = hsub.add_parser("identity", help="this host's certificate and pinned peers (no remusd)")
    hid.add_argument("--json", action="store_true")
    hid.set_defaults(func=cmd_host_identity)
    # `demo` has its own parser: main() hands it the rest of the command line
    sub.add_parser("demo", help="Remus on one machine, primary killed at random (--help)")

    stream = sub.add_parser("stream", help="check, print or generate Xen migration streams")
    ssub = stream.add_subparsers(dest="stream_command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("file", help="stream file, or - for stdin")
        sp.add_argument(
            "--layer",
            choices=["auto", "xl", "libxl", "libxc"],
            default="auto",
            help="outermost layer (default: detect from the first bytes)",
        )
        sp.add_argument(
            "--stream-type",
            choices=[t.value for t in StreamType],
            default="auto",
            help="checkpointed stream type, if known (default: auto)",
        )

    v = ssub.add_parser("verify", help="check every rule of the libxc/libxl specs")
    common(v)
    v.add_argument("--json", action="store_true", help="summary as JSON")
    v.set_defaults(func=cmd_stream_verify)

    d = ssub.add_parser("dump", help="one line per record: offset, layer, type, length, fields")
    common(d)
    d.set_defaults(func=cmd_stream_dump)

    g = ssub.add_parser("generate", help="write a valid synthetic stream (for demos and tests)")
    g.add_argument("file", help="output file, or - for stdout")
    g.add_argument("--layer", choices=["xl", "libxl", "libxc"], default="xl")
    g.add_argument("--stream-type", choices=["plain", "remus", "colo"], default="plain")
    g.add_argument("--domain", choices=["pv", "hvm"], default="hvm")
    g.add_argument("--pages", type=int, default=256)
    g.add_argument("--checkpoints", type=int, default=0)
    g.add_argument("--dirty-pages", type=int, default=16)
    g.set_defaults(func=cmd_stream_generate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="remusctl: %(message)s")
    try:
        rc: int = args.func(args)
    except (HypervisorError, SaveRestoreError, ReplicationError, LinkError) as exc:
        # ReplicationError: refused before replication began (the witness, the peer)
        print(f"remusctl: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"remusctl: {exc}", file=sys.stderr)
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
