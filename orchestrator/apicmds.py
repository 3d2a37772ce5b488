"""`remusctl`'s protection verbs as a client of `remusd`.

protect, unprotect, pause, resume, failover, switchover, status, events and host info
go to remusd's API (its unix socket, ``--socket`` or ``$REMUSD_SOCKET``; or
``--url`` with ``--token-file`` over TCP). ``--json`` prints what the API
returned; without it, a table or a sentence for people.

The in-process modes stay for what has no service behind it: ``remusctl
demo``, and ``protect --foreground`` / ``receive`` (the `xl remus` /
`xl migrate-receive` way, which ``-s`` runs over ssh), whose status files
``status --local``, ``failover --local`` and ``unprotect --local`` read and
signal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .protection.spec import FIELDS, ProtectionSpec
from .service.client import DEFAULT_SOCKET, ApiClient, ApiClientError, ClientError

STATUS_COLUMNS = (
    "name",
    "role",
    "mode",
    "state",
    "checkpoints",
    "last_checkpoint_age_s",
    "pause_ms_p50",
    "ack_lag_ms_p50",
    "dirty_pages_p50",
    "held_packets",
    "reason",
)


def add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--socket",
        default=os.environ.get("REMUSD_SOCKET", DEFAULT_SOCKET),
        help=f"remusd's unix socket (default $REMUSD_SOCKET or {DEFAULT_SOCKET})",
    )
    p.add_argument("--url", help="remusd over TCP instead, https://HOST:PORT")
    p.add_argument("--token-file", help="bearer token for --url")


def client(args: argparse.Namespace) -> ApiClient:
    if args.url:
        token = Path(args.token_file).read_text().strip() if args.token_file else None
        return ApiClient(base_url=args.url, token=token)
    return ApiClient(args.socket)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    )


# (header, status field): shown only when a COLO protection is listed, so that a
# host running Remus alone keeps its table as narrow as it was
COLO_COLUMNS = (
    ("BY_DIVERGENCE", "checkpoints_by_divergence"),
    ("BY_HELD", "checkpoints_by_held_output"),
    ("BY_TIMER", "checkpoints_by_timer"),
    ("COMPARED", "compared_packets"),
    ("MISMATCHES", "mismatches"),
)


def _row(r: dict[str, Any]) -> dict[str, Any]:
    """A status (``ProtectionStatus.to_dict()``, or an API protection with its live status
    on top) as the table shows it: COLO's figures beside the others, and the age of the
    last checkpoint now rather than the time it was taken."""
    at = r.get("last_checkpoint_at")
    age = None if at is None else round(max(0.0, time.time() - float(at)), 3)
    return {**(r.get("colo") or {}), **r, "last_checkpoint_age_s": age}


def status_table(rows: list[dict[str, Any]]) -> str:
    rows = [_row(r) for r in rows]
    colo = any(r.get("mode") == "colo" for r in rows)
    fields = list(STATUS_COLUMNS)
    header = [c.upper() for c in STATUS_COLUMNS]
    if colo:  # before REASON, which is the long one
        at = fields.index("reason")
        fields[at:at] = [f for _, f in COLO_COLUMNS]
        header[at:at] = [h for h, _ in COLO_COLUMNS]
    return table(
        [["" if r.get(c) is None else str(r.get(c)) for c in fields] for r in rows], header
    )


def _flatten(p: dict[str, Any]) -> dict[str, Any]:
    """A protection as the API gives it, with its live status fields on top."""
    return {**p.get("live", {}), **{k: v for k, v in p.items() if k != "live"}}


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def protect_body(args: argparse.Namespace) -> dict[str, Any]:
    """POST /v1/protections's body: the settings given on the command line, and only
    those, so that what was left out takes remusd's configured defaults (its interval,
    its timeouts) rather than remusctl's."""
    spec = ProtectionSpec.from_args(args).to_dict()
    given = {f.name for f in FIELDS if getattr(args, f.name, None) is not None}
    if getattr(args, "colo", False):  # --colo is --mode colo
        given.add("mode")
    return {f.name: spec[f.name] for f in FIELDS if f.api and f.name in given}


def api_protect(args: argparse.Namespace) -> int:
    with client(args) as c:
        p = c.post("/v1/protections", protect_body(args))
    how = " with COLO, the disk not replicated" if p.get("mode") == "colo" else ""
    _out(args, p, f"{p['name']}: protecting to {p['peer']}{how} ({p['state']})")
    return 0


def api_unprotect(args: argparse.Namespace) -> int:
    with client(args) as c:
        c.delete(f"/v1/protections/{args.name}")
    _out(args, {"name": args.name, "unprotected": True}, f"{args.name}: unprotected")
    return 0


def api_pause(args: argparse.Namespace) -> int:
    with client(args) as c:
        p = c.post(f"/v1/protections/{args.name}/{args.command}")
    _out(args, p, f"{p['name']}: {p['state']}")
    return 0


def api_failover(args: argparse.Namespace) -> int:
    with client(args) as c:
        r = c.post(f"/v1/protections/{args.name}/failover", {"force": args.force})
    _out(args, r, f"{args.name}: failover requested")
    return 0


def api_switchover(args: argparse.Namespace) -> int:
    with client(args) as c:
        p = c.post(f"/v1/protections/{args.name}/switchover")
    pause = p.get("live", {}).get("switchover_pause_ms")
    paused = f", the guest paused {pause:.0f} ms" if isinstance(pause, int | float) else ""
    _out(args, p, f"{p['name']}: switched over to {p['peer']}{paused}; this host becomes its "
         "secondary")  # fmt: skip
    return 0


def api_status(args: argparse.Namespace) -> int:
    with client(args) as c:
        one = args.name is not None
        rows = [c.get(f"/v1/protections/{args.name}")] if one else c.get("/v1/protections")
    _out(args, rows, status_table([_flatten(r) for r in rows]))
    return 0


def api_events(args: argparse.Namespace) -> int:
    with client(args) as c:
        if args.follow:
            path = "/v1/events/stream" + (f"?name={args.name}" if args.name else "")
            for ev in c.events(path):
                e = ev.data
                print(json.dumps(e) if args.json else _event_line(e), flush=True)
            return 0
        q = f"/v1/events?limit={args.limit}" + (f"&name={args.name}" if args.name else "")
        events = c.get(q)
    _out(args, events, "\n".join(_event_line(e) for e in events))
    return 0


def _event_line(e: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts"]))
    return f"{when}  {e['id']:>6}  {e['name'] or '-':<16} {e['kind']:<20} {e['message']}"


def api_host_info(args: argparse.Namespace) -> int:
    with client(args) as c:
        h = c.get("/v1/host")
    helper, rep = h["helper"], h["replication"]
    lines = [
        f"backend:      {h['backend']} ({h.get('sim_host') or ''})",
        f"xen:          {h['xen_version'] or 'not running on Xen'}",
        f"save helper:  {helper['path'] or helper['error']} (version {helper['version']})",
        f"libvirt:      {json.dumps(h['libvirt'])}",
        "netbuf:       " + ", ".join(f"{k}: {v}" for k, v in h["netbuf"].items()),
        f"replication:  {rep['listen']} (protocol {rep['protocol_version']}, "
        f"link {rep.get('link', '?')})",
    ]
    mem = h.get("memory") or {}
    if "free_bytes" in mem:
        lines.append(
            f"memory:       {mem['free_bytes'] >> 20} MiB free of {mem['total_bytes'] >> 20} MiB, "
            f"{mem['claimed_bytes'] >> 20} MiB claimed ({mem['source']})"
        )
    else:
        lines.append(f"memory:       unknown ({mem.get('error', 'not reported')})")
    ident = h.get("identity") or {}
    lines.append(f"identity:     {ident.get('fingerprint') or 'none (remusctl host init)'}")
    lines += [
        f"  trusts {p['name']}: {p['fingerprint']}"
        + ("" if p["certificate"] else " (fingerprint only)")
        for p in ident.get("trusted", [])
    ]
    _out(args, h, "\n".join(lines))
    return 0


def run_api(func: Any, args: argparse.Namespace) -> int:
    """Run one API verb; remusd's errors become a message and exit status 1."""
    try:
        rc: int = func(args)
    except ApiClientError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": {"code": exc.code, "message": exc.message,
                                        "details": exc.details}}))  # fmt: skip
        else:
            print(f"remusctl: {exc.code}: {exc.message}", file=sys.stderr)
            for r in (exc.details or {}).get("reasons", []):
                print(f"  - {r['check']}: {r['message']}", file=sys.stderr)
        return 1
    except ClientError as exc:
        print(f"remusctl: {exc}", file=sys.stderr)
        return 2
    return rc
