"""Joining Ray: the one place that checks a Ray address and connects to it, failing in seconds when it is wrong.

Evaluation's workers (:mod:`latentgraph.evaluation.workers`) and served replicas both run on Ray, so this module
sits at the top of the package, beside :mod:`latentgraph.errors`: either imports it without importing the other,
and it imports nothing of latentgraph but the errors.

Why not hand the address straight to ``ray.init``: where no Ray cluster answers, ``ray.init`` retries for about
14 minutes (forever for some addresses) before it fails, and a malformed address ends in a bare ``ValueError``.
So :func:`join_ray` first checks the address's form (:func:`check_address`, no network), then asks a child
process to reach the cluster's GCS, the service ``ray.init`` connects to first (:func:`probe`). The child is
killed when ``PROBE_SECONDS`` pass without an answer. A child, not a thread: a thread stuck in Ray's connect
loop cannot be stopped, Ray's timeouts are settings of the whole process, and the child's Ray client touches
nothing in this one. A healthy GCS answers in a second; only then does ``ray.init`` run.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from .errors import InputError

PROBE_SECONDS = 10  # for the child to reach the GCS: a running one answers within about a second
CONNECT_SECONDS = 5  # for the TCP handshake alone: longer means no route, or a firewall that drops packets
START_FIX = ("start a cluster with `ray start --head` on its head node and pass the GCS address that command prints "
             "(host:port, port 6379 unless --port said otherwise; not the dashboard's 8265 or the Ray Client's "
             "10001), or 'auto' on a node of the cluster, or leave the address out for a local Ray instance")


def import_ray(purpose: str) -> Any:
    """The ``ray`` module, or an :class:`InputError` saying that ``purpose`` needs it and how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError(f'{purpose} needs Ray: pip install "latentgraph[ray]"') from None
    return ray


def check_address(address: str) -> None:
    """Refuse a Ray address that is not ``'auto'`` or ``host:port`` (port 1 to 65535, an IPv6 host in brackets),
    saying what to pass instead; for ``'auto'``, check ``RAY_ADDRESS`` when it is set, as Ray then joins that.
    Checks the form only; :func:`join_ray` checks that a cluster answers there."""
    if address == "auto":
        if os.environ.get("RAY_ADDRESS"):
            _check_form(os.environ["RAY_ADDRESS"], "RAY_ADDRESS (which 'auto' joins)")
        return
    _check_form(address, "Ray address")


def _check_form(address: str, what: str) -> None:
    if address == "auto":
        return
    scheme, url, _ = address.partition("://")
    if url and scheme == "ray":
        raise InputError(f"{what} {address!r} is a Ray Client address, which latentgraph does not use: the "
                         "driver must run on a node of the cluster; run it there with 'auto' or the head's "
                         "host:port, for example through `ray job submit -- latentgraph ...`")
    if url:
        raise InputError(f"{what} {address!r} is a URL (the dashboard's, if its port is 8265); pass the "
                         f"cluster's GCS address as host:port, without {scheme}://, e.g. HEAD_IP:6379")
    host, colon, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise InputError(f"{what} {address!r}: write an IPv6 host in brackets, e.g. [::1]:6379")
    if not (colon and host and port.isdigit()):
        raise InputError(f"{what} {address!r} is not host:port or 'auto'; {START_FIX}")
    if not 1 <= int(port) <= 65535:
        raise InputError(f"{what} {address!r}: port {port} is not between 1 and 65535; {START_FIX}")


def join_ray(address: str | None, *, local_cpus: int) -> bool:
    """Connect this process to Ray: to the cluster at ``address`` (``'auto'``: the one this machine belongs to,
    as ``RAY_ADDRESS`` or the last ``ray start`` here says), or, when it is None, to a new local Ray instance with
    ``local_cpus`` CPUs (even when ``RAY_ADDRESS`` is set, or a cluster runs here). A Ray already initialised in
    this process is used as it is.

    Returns True when this call connected (the caller then calls ``ray.shutdown()`` when done).

    Raises:
        InputError: Ray is not installed; the address is malformed; no Ray cluster answers there within
            ``PROBE_SECONDS`` (or ``CONNECT_SECONDS``, when nothing accepts the connection); or the cluster refuses
            to be joined. The message says what to check.
    """
    ray = import_ray("latentgraph's Ray support")
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "logging_level": logging.ERROR}
    if address is None:
        ray.init(address="local", num_cpus=local_cpus, **quiet)  # "local": Ray's name for a new instance
        return True
    check_address(address)
    problem = _run_probe(address)
    if problem is not None:
        raise InputError(f"cannot join the Ray cluster at {address!r}: {problem}")
    try:
        ray.init(address=address, **quiet)
    except ConnectionError as e:
        raise InputError(f"cannot join the Ray cluster at {address!r} ({e}); {START_FIX}") from None
    return True


def _run_probe(address: str) -> str | None:
    """What stops this machine from joining the Ray cluster at ``address`` (None: nothing), found by
    :func:`probe` in a child process that is killed after ``PROBE_SECONDS``."""
    package_root = str(Path(__file__).resolve().parents[1])  # the child imports this latentgraph, however found
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    code = "import sys; from latentgraph.ray_cluster import probe; sys.exit(probe(sys.argv[1]))"
    try:
        child = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, env=env,
                               timeout=PROBE_SECONDS)
    except subprocess.TimeoutExpired:  # run() has killed the child and waited for it
        return (f"something accepts connections there, but no Ray GCS answered within {PROBE_SECONDS} s; check "
                f"that it is the GCS port: {START_FIX}")
    if child.returncode == 0:
        return None
    said = (child.stdout.strip() or child.stderr.strip() or f"the probe exited with {child.returncode}")
    return said.splitlines()[-1]


def probe(address: str) -> int:
    """Run in a child process by :func:`join_ray`: reach the GCS of the Ray cluster at ``address`` as ``ray.init``
    would. Returns 0 when it answers; else prints what is wrong and how to fix it, and returns 1."""
    import ray._private.services as services
    from ray._raylet import GcsClient

    # ray.init uses this machine's Ray token (if any) only for a cluster it finds itself: 'auto' without RAY_ADDRESS
    found_by_ray = address == "auto" and not os.environ.get("RAY_ADDRESS")
    if address == "auto":
        try:
            address = services.canonicalize_bootstrap_address_or_die(address)
        except ConnectionError:
            print("'auto' found no Ray cluster on this machine (it reads RAY_ADDRESS, then the cluster that "
                  f"`ray start` last started here); {START_FIX}")
            return 1
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except socket.gaierror as e:
        print(f"its host {host!r} is unknown ({e.strerror}); check its spelling, or pass its IP address")
        return 1
    except TimeoutError:
        print(f"no answer from {address} within {CONNECT_SECONDS} s (a wrong IP address, or a firewall that drops "
              f"the connection); {START_FIX}")
        return 1
    except OSError as e:  # refused (nothing listens on that port), no route to the host, ...
        print(f"{address} cannot be reached ({e.strerror or e}): is the cluster running? {START_FIX}")
        return 1
    try:
        GcsClient(address=address)  # asks the GCS for the cluster's id: only a Ray GCS answers that
    except Exception as e:
        if type(e).__name__ == "AuthenticationError":  # a Ray GCS, which wants a token
            if found_by_ray:
                return 0  # ray.init will try this machine's token, if it has one
            print("the cluster requires a token, which this process lacks: set RAY_AUTH_MODE=token and give the "
                  "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the head node "
                  "prints it)")
            return 1
        # not a GCS, though most such listeners make the parent's timeout end the probe first
        print(f"no Ray GCS answers at {address} ({(str(e).strip() or type(e).__name__).splitlines()[0]}); "
              f"{START_FIX}")
        return 1
    return 0
