"""Replicas on Ray Serve: ``latentgraph serve --replicas N`` serves the single server's app from N copies of the
system, on a local Ray instance or a Ray cluster, for more requests than one process answers.

Each replica (:class:`~latentgraph.serve.replica.Replica`) loads its own copy of the system from the choice made
on the command line and batches the requests it gets. Ray Serve's HTTP proxy listens on ``--host``/``--port``
and spreads requests over the replicas that are up. A replica that dies is replaced by Ray Serve; a request it
was answering ends with an error in OpenAI's shape (a 500, or a stream's last event: see
:mod:`~latentgraph.serve.proxy`), and those on the other replicas go on.

Ray Serve runs once per Ray cluster and listens where it was first started, so this module starts it, with our
address, and refuses a cluster where it already runs; it shuts Serve down when serving stops, and Ray too if it
started it. Ray is imported when the replicas start, not with this module.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InputError, WorkerError
from ..ray_cluster import check_address, join_ray
from . import proxy
from .limits import Limits
from .server import check_exposure, listen

APP = "latentgraph"  # the Ray Serve application's name
QUIET = {"log_level": "WARNING", "enable_access_log": False}  # Ray Serve's logging: problems only
INSTALL = 'pip install "latentgraph[replicas]"'


@dataclass(frozen=True)
class ReplicaOptions:
    """How many replicas serve, where, and with what each (the ``--replicas`` flags of ``latentgraph serve``).

    Args:
        replicas: copies of the system, each a Ray Serve replica that loads its own.
        address: the Ray cluster to join, ``host:port`` of its GCS or ``"auto"``; None: a new local Ray instance
            sized for the replicas (see :func:`~latentgraph.ray_cluster.join_ray`).
        gpus_per_replica: GPUs each replica asks Ray for, its backbones on them (fractions share a GPU; above 1,
            each backbone is spread over the replica's GPUs); 0 runs on CPUs.
        threads_per_replica: CPU threads of each replica, and the CPUs it asks Ray for.
    """

    replicas: int
    address: str | None = None
    gpus_per_replica: float = 0
    threads_per_replica: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.replicas, int) and self.replicas >= 1):
            raise InputError(f"--replicas must be an integer >= 1 (copies of the system on Ray Serve), got "
                             f"{self.replicas!r}; leave it out to serve from this process")
        if not (isinstance(self.threads_per_replica, int) and self.threads_per_replica >= 1):
            raise InputError(f"--threads-per-replica must be an integer >= 1, got {self.threads_per_replica!r}")
        if not (isinstance(self.gpus_per_replica, (int, float)) and self.gpus_per_replica >= 0):
            raise InputError(f"--gpus-per-replica must be a number >= 0 (0: run on CPUs), got "
                             f"{self.gpus_per_replica!r}")
        if self.address is not None:
            check_address(self.address)  # its form now; whether a cluster answers there when the replicas start

    def placement(self) -> dict[str, str]:
        """Where each replica places its backbones: on its GPU (spread over its GPUs by ``device_map="auto"``
        when it has several: Ray shows it only its own), else on CPUs."""
        if self.gpus_per_replica > 1:
            return {"device_map": "auto"}
        return {"device": "cuda" if self.gpus_per_replica > 0 else "cpu"}


class Deployed:
    """N replicas of a system on Ray Serve, its proxy on ``host:port``, while the context is entered.

    Entering joins Ray (a local instance when ``options.address`` is None), checks that the cluster can hold the
    replicas and that Ray Serve does not run there yet, starts Serve and deploys the replicas, and returns once
    each has loaded the system. Leaving shuts Serve down, and Ray if entering started it.
    """

    def __init__(self, style: str, load_options: dict[str, Any], options: ReplicaOptions, *, name: str,
                 host: str, port: int, limits: Limits, api_key: str | None = None, cors_origins: Sequence[str] = (),
                 say: Callable[[str], None] = lambda line: None):
        self.style, self.options, self.say = style, options, say
        self.load_options = load_options | options.placement()
        self.app_options = {"name": name, "limits": limits, "api_key": api_key, "cors_origins": tuple(cors_origins),
                            "threads": options.threads_per_replica}
        self.host, self.port = host, port
        self.started_ray = self.started_serve = False

    @property
    def url(self) -> str:
        host = self.host.strip("[]")
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def __enter__(self) -> Deployed:
        serve, replica = _import_serve()
        import ray

        with listen(self.host, self.port) as sock:  # the address is free: an error now, not in Ray's proxy
            self.port = sock.getsockname()[1]  # port 0: a free one, chosen here
        options = self.options
        self.started_ray = join_ray(options.address, local_cpus=options.replicas * options.threads_per_replica)
        try:
            _check_resources(ray, options)
            _check_no_serve(serve)
            self.say(f"starting Ray Serve and {options.replicas} replicas of '{self.app_options['name']}' (each "
                     "loads the system)")
            self.started_serve = True
            serve.start(http_options={"host": self.host.strip("[]"), "port": self.port}, logging_config=QUIET,
                        controller_options={"runtime_env": {"env_vars": proxy.CALLBACK}})  # the proxies inherit it
            limits = self.app_options["limits"]
            deployment = serve.deployment(
                replica.Replica, name="Replica", num_replicas=options.replicas,
                ray_actor_options={"num_cpus": options.threads_per_replica, "num_gpus": options.gpus_per_replica},
                # every request that the replica's own queue would take, so that batches fill and its 503s apply
                max_ongoing_requests=limits.max_batch_size + limits.max_queue,
                # the start fails once each replica has failed to load the system, without one that did: a wrong
                # choice fails as soon as it can (later, dead replicas are replaced however often they die)
                max_constructor_retry_count=options.replicas)
            try:
                serve.run(deployment.bind(self.style, self.load_options, **self.app_options), name=APP,
                          route_prefix="/", logging_config=QUIET)
            except RuntimeError:
                raise WorkerError(f"the replicas could not start ({_why_failed(serve)}); see the replicas' log "
                                  "above") from None
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exception: object) -> None:
        if self.started_serve:
            from ray import serve

            serve.shutdown()
            self.started_serve = False
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False


def serve_replicas(style: str, load_options: dict[str, Any], options: ReplicaOptions, *, name: str, host: str,
                   port: int, limits: Limits, api_key: str | None = None, allow_no_key: bool = False,
                   cors_origins: Sequence[str] = (), say: Callable[[str], None] = print,
                   until: Callable[[], None] | None = None) -> None:
    """Serve ``style`` (loaded by each replica with ``load_options`` and its placement) from replicas on Ray Serve
    until ``until`` returns (by default: until Ctrl-C or SIGTERM); ``say`` tells the user where."""
    check_exposure(host, api_key, allow_no_key)
    _import_serve()  # before anything else: without Ray Serve, one error line
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # not its start-up chatter: we say where it listens
    with Deployed(style, load_options, options, name=name, host=host, port=port, limits=limits, api_key=api_key,
                  cors_origins=cors_origins, say=say) as deployed:
        say(f"serving '{name}' from {options.replicas} replicas at {deployed.url}/v1 (OpenAI-compatible, on Ray "
            "Serve); /health and /metrics answer for the replica a request reaches. Ctrl-C stops it.")
        (until or wait_for_stop)()
    say("stopped")


def wait_for_stop() -> None:
    """Return on Ctrl-C or SIGTERM (in the main thread), with the signals' handlers as they were."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _import_serve() -> tuple[Any, Any]:
    """Ray Serve and the replica module, or an :class:`InputError` saying how to install them."""
    try:
        from ray import serve

        from . import replica
    except ImportError as e:
        raise InputError(f"serving on replicas needs Ray Serve ({e.name} is missing): {INSTALL}") from None
    return serve, replica


def _check_resources(ray: Any, options: ReplicaOptions) -> None:
    """Refuse replicas the cluster cannot hold, which Ray Serve would otherwise wait on forever."""
    have = ray.cluster_resources()
    for resource, each, flag in (("CPU", options.threads_per_replica, "--threads-per-replica"),
                                 ("GPU", options.gpus_per_replica, "--gpus-per-replica")):
        need = options.replicas * each
        if need > have.get(resource, 0):
            raise InputError(f"{options.replicas} replicas with {flag} {each:g} need {need:g} {resource}s, but the "
                             f"Ray cluster has {have.get(resource, 0):g}; ask for fewer replicas or a smaller {flag}, "
                             "or add nodes")


def _check_no_serve(serve: Any) -> None:
    """Refuse a cluster where Ray Serve runs already: it listens where it was started, not on ``--host``/``--port``,
    and its applications are not ours to stop."""
    status = serve.status()
    if status.proxies or status.applications:
        running = ", ".join(status.applications) or "no application"
        raise InputError(f"Ray Serve already runs on this Ray cluster ({running}); latentgraph serve --replicas starts "
                         "its own: stop that one with `serve shutdown` (with --address http://HEAD_IP:8265, the "
                         "dashboard's address, for a remote cluster), or use another cluster")


def _why_failed(serve: Any) -> str:
    """The last line of what Ray Serve says about our failed deployment (the exception a replica raised)."""
    try:
        deployments = serve.status().applications[APP].deployments
    except KeyError:
        return "Ray Serve gave no reason"
    said = [line.strip() for d in deployments.values() for line in d.message.splitlines() if line.strip()]
    return said[-1] if said else "Ray Serve gave no reason"
