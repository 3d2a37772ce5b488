# -*- coding: utf-8 -*-
# Copyright: remus orchestrator developers
# GNU General Public License v2.0 only (see https://spdx.org/licenses/GPL-2.0-only.html)
# SPDX-License-Identifier: GPL-2.0-only
"""One client for remusd's HTTP API, for every module of the collection.

It speaks to remusd over its unix socket (the default, ``/run/remus/remusd.sock``)
or over TCP, HTTPS with a bearer token, and uses nothing but what ansible-core
ships (``ansible.module_utils.urls``, which has a unix-socket handler), so the
managed host needs nothing of remusd's own Python package.

Errors come in two kinds: :class:`RemusdApiError` when remusd answered with its
error body (``{"error": {"code", "message", "details"}}``; the code is stable),
:class:`RemusdUnreachable` when there was no usable answer at all.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import socket
import time

from ansible.module_utils.common.text.converters import to_native, to_text
from ansible.module_utils.six.moves.urllib.error import HTTPError, URLError
from ansible.module_utils.six.moves.urllib.parse import quote, urlsplit
from ansible.module_utils.urls import ConnectionError as UrlsConnectionError
from ansible.module_utils.urls import open_url

DEFAULT_SOCKET = "/run/remus/remusd.sock"


def connection_argument_spec():
    """The connection options every module of the collection takes."""
    return dict(
        socket=dict(type="path"),
        url=dict(type="str"),
        token=dict(type="str", no_log=True),
        token_file=dict(type="path"),
        validate_certs=dict(type="bool", default=True),
        ca_path=dict(type="path"),
        request_timeout=dict(type="float", default=30.0),
    )


CONNECTION_MUTUALLY_EXCLUSIVE = [("socket", "url"), ("token", "token_file")]


class RemusdError(Exception):
    """Anything this client raises."""


class RemusdUnreachable(RemusdError):
    """No usable answer from remusd; the message says why."""


class RemusdApiError(RemusdError):
    """remusd answered with an error: ``code`` is the stable part to switch on."""

    def __init__(self, status, code, message, details=None):
        super(RemusdApiError, self).__init__("%s (%s, HTTP %s)" % (message, code, status))
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def reasons(self):
        """The typed reasons of a refused protection ([{check, message}]), if any."""
        if isinstance(self.details, dict) and isinstance(self.details.get("reasons"), list):
            return list(self.details["reasons"])
        return []

    def as_dict(self):
        return dict(status=self.status, code=self.code, message=self.message, details=self.details)


class RemusdClient:
    """remusd's API on ``socket`` (default) or at ``url`` (``https://HOST:PORT``)."""

    def __init__(
        self,
        socket_path=None,
        url=None,
        token=None,
        validate_certs=True,
        ca_path=None,
        timeout=30.0,
    ):
        if socket_path and url:
            raise ValueError("give socket or url, not both")
        self.timeout = timeout
        self.token = token
        self.validate_certs = validate_certs
        self.ca_path = ca_path
        if url:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("url %r is not https://HOST:PORT (or http:// on loopback)" % url)
            self.socket_path = None
            self.base = url.rstrip("/")
            self.where = self.base
        else:
            self.socket_path = socket_path or DEFAULT_SOCKET
            # the host name is not used on a unix socket; remusd sees Host: localhost
            self.base = "http://localhost"
            self.where = self.socket_path

    def request(self, method, path, body=None, timeout=None):
        """``method`` on ``path``; the parsed JSON answer (None for an empty one).
        ``timeout``: seconds it may take, if not the client's own."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = "Bearer %s" % self.token
        try:
            response = open_url(
                self.base + path,
                data=data,
                headers=headers,
                method=method,
                timeout=self.timeout if timeout is None else timeout,
                validate_certs=self.validate_certs,
                ca_path=self.ca_path,
                unix_socket=self.socket_path,
                # a unix socket is never proxied; nor is an API a proxy would cache
                use_proxy=self.socket_path is None,
                follow_redirects="none",
                http_agent="xenha.remus",
                use_netrc=False,
            )
            raw = response.read()
        except HTTPError as exc:
            raise self._api_error(exc)
        except UrlsConnectionError as exc:
            # certificate validation, and the proxy: ansible's own errors
            raise RemusdUnreachable("remusd at %s: %s" % (self.where, to_native(exc)))
        except URLError as exc:
            raise RemusdUnreachable(
                "remusd at %s does not answer: %s" % (self.where, to_native(exc.reason))
            )
        except (socket.timeout, OSError) as exc:
            raise RemusdUnreachable("remusd at %s does not answer: %s" % (self.where, to_native(exc)))
        if not raw:
            return None
        try:
            return json.loads(to_text(raw, errors="surrogate_or_strict"))
        except ValueError:
            raise RemusdUnreachable("remusd at %s answered with something not JSON" % self.where)

    def _api_error(self, exc):
        status = exc.code
        try:
            raw = exc.read()
        except Exception:  # the body of an error is a courtesy; its status is the answer
            raw = b""
        try:
            err = json.loads(to_text(raw, errors="surrogate_or_strict"))["error"]
            return RemusdApiError(status, err["code"], err["message"], err.get("details"))
        except (ValueError, KeyError, TypeError):
            # not remusd's error shape: a proxy, or not remusd at all
            text = to_text(raw, errors="surrogate_or_replace").strip()[:200]
            return RemusdApiError(status, "HTTP_%s" % status, text or to_native(exc.reason))

    # -- the API's resources -----------------------------------------------------------

    def health(self):
        return self.request("GET", "/v1/health")

    def host(self):
        return self.request("GET", "/v1/host")

    def protections(self):
        return self.request("GET", "/v1/protections")

    def protection(self, name):
        """The protection's document, or None when this host has none of that name."""
        try:
            return self.request("GET", "/v1/protections/%s" % quote(name, safe=""))
        except RemusdApiError as exc:
            if exc.code == "PROTECTION_NOT_FOUND":
                return None
            raise

    def protect(self, body):
        return self.request("POST", "/v1/protections", body)

    def preflight(self, body):
        """remusd's pre-flight of a protection with this body; changes nothing."""
        return self.request("POST", "/v1/preflight", body)

    def unprotect(self, name):
        return self.request("DELETE", "/v1/protections/%s" % quote(name, safe=""))

    def pause(self, name):
        return self.request("POST", "/v1/protections/%s/pause" % quote(name, safe=""))

    def resume(self, name):
        return self.request("POST", "/v1/protections/%s/resume" % quote(name, safe=""))

    def failover(self, name, force=False):
        return self.request(
            "POST", "/v1/protections/%s/failover" % quote(name, safe=""), {"force": bool(force)}
        )

    def switchover(self, name, timeout=None):
        """A planned swap of roles, on the primary's remusd: answers once done (the
        protection's document, its state switched-over), which can take longer than
        other requests (``timeout``)."""
        return self.request(
            "POST", "/v1/protections/%s/switchover" % quote(name, safe=""), timeout=timeout
        )

    def wait_for(self, name, done, timeout, interval=0.25, clock=time.monotonic, sleep=time.sleep):
        """Poll ``name``'s document until ``done(doc)`` says True (doc is None when there
        is no protection of that name). Returns (reached, last doc)."""
        deadline = clock() + timeout
        while True:
            doc = self.protection(name)
            if done(doc):
                return True, doc
            if clock() >= deadline:
                return False, doc
            sleep(interval)


def client_from_module(module):
    """The client for a module's connection options; fails the module on bad ones."""
    p = module.params
    token = p.get("token")
    if p.get("token_file"):
        try:
            with open(p["token_file"], "rb") as f:
                token = to_text(f.read(), errors="surrogate_or_strict").strip()
        except (IOError, OSError) as exc:
            module.fail_json(msg="token_file %s: %s" % (p["token_file"], to_native(exc)))
        if not token:
            module.fail_json(msg="token_file %s is empty" % p["token_file"])
    try:
        return RemusdClient(
            socket_path=p.get("socket"),
            url=p.get("url"),
            token=token,
            validate_certs=p.get("validate_certs", True),
            ca_path=p.get("ca_path"),
            timeout=p.get("request_timeout") or 30.0,
        )
    except ValueError as exc:
        module.fail_json(msg=to_native(exc))
