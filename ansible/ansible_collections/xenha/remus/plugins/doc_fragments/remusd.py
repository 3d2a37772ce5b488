# -*- coding: utf-8 -*-
# Copyright: remus orchestrator developers
# GNU General Public License v2.0 only (see https://spdx.org/licenses/GPL-2.0-only.html)
# SPDX-License-Identifier: GPL-2.0-only

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # How every module of the collection reaches remusd.
    DOCUMENTATION = r"""
options:
  socket:
    description:
      - The unix socket of remusd's API on the managed host (remusd's C([api] socket)).
      - Used when I(url) is not given; the default is C(/run/remus/remusd.sock).
      - Mutually exclusive with I(url).
    type: path
  url:
    description:
      - remusd's API over TCP instead of its unix socket, as C(https://HOST:PORT)
        (remusd's C([api] tcp) with C(tls_cert) and C(tls_key)). C(http://) is
        accepted for a listener on loopback, the only place remusd serves plain HTTP.
      - remusd asks for a bearer token on TCP; give it with I(token) or I(token_file).
      - Mutually exclusive with I(socket).
    type: str
  token:
    description:
      - The bearer token remusd asks for on TCP (the content of its C([api] token_file)).
      - Mutually exclusive with I(token_file).
    type: str
  token_file:
    description:
      - A file on the managed host whose content (stripped) is the bearer token.
      - Mutually exclusive with I(token).
    type: path
  validate_certs:
    description:
      - Whether to check remusd's TLS certificate against the trusted CAs (and I(ca_path)).
      - Only C(false) with a self-signed certificate on a network you trust.
    type: bool
    default: true
  ca_path:
    description:
      - A PEM file of CA certificates to check remusd's certificate with.
    type: path
  request_timeout:
    description:
      - Seconds one request to remusd may take.
    type: float
    default: 30.0
notes:
  - The modules talk to remusd's HTTP API with what ansible-core ships; the managed host
    needs Python and a running remusd, and nothing of remusd's own Python package.
  - Each module of the collection is in the action group C(xenha.remus.remusd), so the
    connection can be given once for all of them, in C(module_defaults) under
    C(group/xenha.remus.remusd).
"""

    # The settings of a protection: remusd's POST /v1/protections body, less the name.
    SETTINGS = r"""
options:
  peer:
    description:
      - C(HOST:PORT) of the secondary's remusd replication endpoint (its
        C([replication] listen), port 8002 by default).
      - Give I(peer) or I(ssh), not both.
    type: str
  ssh:
    description:
      - C([USER@]HOST[:PORT]) to start the receiver on over SSH (C(remusctl receive
        --stdio) on the peer's C(PATH)), as C(xl remus) does; both channels then run
        over that SSH session instead of a TCP link.
      - The peer's host key must be in a known_hosts file; an unknown key is refused.
    type: str
  ssh_known_hosts:
    description:
      - A known_hosts file checked besides the user's and the system's, for I(ssh).
    type: str
  ssh_identity:
    description:
      - A private key file to log in with, for I(ssh) (else the agent or C(~/.ssh/id_*)).
    type: str
  mode:
    description:
      - C(remus) checkpoints every I(interval_ms); C(colo) runs both copies and
        checkpoints when their output differs.
      - When not given, remusd's default (C(remus)).
    type: str
    choices: [remus, colo]
  interval_ms:
    description:
      - Checkpoint interval in milliseconds, the time a checkpoint takes included (0 to 60000).
      - When not given, remusd's C([replication] interval_ms).
    type: int
  heartbeat_interval_ms:
    description:
      - How often each side tells the other it is alive, in milliseconds (1 to 60000).
      - When not given, remusd's C([replication] heartbeat_interval_ms).
    type: int
  heartbeat_timeout_ms:
    description:
      - The secondary takes over after this many milliseconds without a word from the
        primary (10 to 600000).
      - When not given, remusd's C([replication] heartbeat_timeout_ms).
    type: int
  ack_timeout_ms:
    description:
      - A checkpoint not acknowledged within this many milliseconds ends replication
        (10 to 600000).
      - When not given, remusd's C([replication] ack_timeout_ms).
    type: int
  netbuf:
    description:
      - How a Remus primary holds the guest's output until the checkpoint's
        acknowledgement. C(plug) is Xen's plug qdisc (needs sch_plug), C(nfqueue)
        NFQUEUE on the guest's vif, C(proxy) a userspace proxy clients connect
        through; C(auto) takes the first that works.
      - When not given, C(auto).
    type: str
    choices: [auto, plug, nfqueue, proxy]
  no_netbuf:
    description:
      - Remus without network buffering (output leaves before its checkpoint is safe);
        COLO without comparing output. Unsafe; needs I(unsafe=true).
    type: bool
  no_disk:
    description:
      - Remus without disk replication. Unsafe; needs I(unsafe=true). COLO never
        replicates the disk and ignores it.
    type: bool
  unsafe:
    description:
      - Allow the unsafe switches (I(no_netbuf), I(no_disk), I(witness=none)), as
        C(xl remus -F) does.
    type: bool
  checkpoint_max_interval_ms:
    description:
      - COLO, at most this many milliseconds between checkpoints (1 to 3600000).
    type: int
  compare_timeout_ms:
    description:
      - COLO, how long in milliseconds output is held for the secondary's to compare
        with before a checkpoint is asked for (above 0, up to 60000).
    type: float
  witness:
    description:
      - The witness as tooz spells it (C(file:///DIR), C(etcd3+http://HOST:PORT),
        C(etcd3+https://HOST:PORT)). Only the holder of the protection's lease on it
        runs the guest and releases its output.
      - When not given, remusd's C([witness] url), or the backend's own.
      - C(none) protects without a witness (a partition can leave two copies running);
        it needs I(unsafe=true).
    type: str
  lease_ttl_ms:
    description:
      - How long the lease outlives its last renewal, in milliseconds (1000 to 60000);
        the secondary takes over no sooner than this after the primary stopped renewing.
      - When not given, remusd's C([witness] lease_ttl_ms).
    type: int
  insecure_link:
    description:
      - Plain TCP for the replication link, no TLS and no authentication of the peer
        (the default is mutual TLS between hosts that pinned each other's certificate).
      - When not given, remusd's C([replication] insecure).
    type: bool
"""
