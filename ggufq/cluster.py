"""Encoding jobs on a Ray cluster: ``ggufq convert --executor ray[://ADDRESS]`` (extra ``ggufq[ray]``).

The driver (the ``ggufq convert`` process) keeps everything that is ordered or written: the plan,
the header-first streaming writer of :mod:`ggufq.write`, the temporary file and its atomic
placement, the progress line. Only the encoding of chunks moves: each chunk is one Ray task that
runs the job function the local pool runs (:func:`ggufq.write.encode_chunk`) on a worker that
opens the model folder itself, by the same path (a shared filesystem, or the same download on every
node), and reads only its own rows; the task gets the tensor's name, its type, a row range and the
chunk's importance vector, and returns the encoded bytes. No weight goes through the driver.

* Tasks are pure functions of (model files, tensor, rows, type, importance): a task lost with its
  worker or node is run again by Ray (``max_retries``), and the bytes are the same.
* The driver keeps a bounded window of tasks in flight (:attr:`RayExecutor.window`, twice the CPUs
  of the nodes that passed the probe) and takes their results in file order, so its memory is flat
  in the model's size.
* Before any byte is written, :func:`connect` checks the cluster: the address answers (a TCP connect
  with a timeout first, so a wrong address is one line, not Ray's minute of retries), and one small
  probe task per node with CPUs reports the node's ggufq version, a digest of ggufq's code and a
  digest of the model folder as that node reads it (tensor names, shapes and types, file sizes). A
  node that cannot read the folder, runs another ggufq, or sees other files is one line naming it.
  Each encoding task checks the model digest again (a node that joined after the probe).
* ``ADDRESS`` is the cluster's GCS address, as ``ray start --address`` takes it (``HOST:6379``);
  plain ``ray`` joins the cluster this machine is part of (``RAY_ADDRESS``, or ``ray start`` here).
  The driver joins as a Ray driver: it runs on a machine that reaches every node (usually the head).
  Ray Client (``ray.init("ray://HOST:10001")``) is not used: results would come back through its proxy.
* Close: :meth:`RayExecutor.close` cancels (force-kills) every task still in flight and disconnects;
  Ray ends the job's worker processes with the driver. ggufq's SIGINT/SIGTERM/SIGHUP handlers
  (:mod:`ggufq.procs`) are put back after ``ray.init``, which installs its own SIGTERM handler.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import GgufqError, __version__

MISSING = "--executor ray needs Ray on this machine and on the cluster: pip install 'ggufq[ray]'"
CONNECT_TIMEOUT = 10.0        # seconds for the TCP check of ADDRESS
PROBE_TIMEOUT = 180.0         # seconds for every node's probe task (a node starts a Python worker)
MAX_RETRIES = 4               # Ray's retries of a task whose worker or node died


def parse(executor: Optional[str]) -> Optional[str]:
    """``--executor`` -> the Ray address to join (``"auto"`` for plain ``ray``), or None for local."""
    if executor is None or executor == "local":
        return None
    if executor == "ray":
        return "auto"
    if executor.startswith("ray://"):
        addr = executor[len("ray://"):]
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise GgufqError(f"--executor {executor}: expected ray://HOST:PORT (the cluster's GCS address, "
                             "as `ray start --address` takes it)")
        return addr
    raise GgufqError(f"--executor {executor}: expected local, ray or ray://HOST:PORT")


def available() -> bool:
    import importlib.util
    return importlib.util.find_spec("ray") is not None


def code_digest() -> str:
    """sha256 of ggufq's own source files (the package as this process imported it): two nodes
    with the same digest encode the same bytes."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def model_digest(model_dir: str) -> str:
    """sha256 of what the folder gives the converter: every GGUF tensor's name, shape and native
    type, and every input file's name and size (no weight is read)."""
    from .convert import prepare
    p = prepare(model_dir)
    rows = [[t.name, list(t.shape), int(t.native) if t.native is not None else None] for t in p.tensors]
    files = [[f.name, f.stat().st_size] for f in p.model.input_files()]
    return hashlib.sha256(json.dumps([rows, files]).encode()).hexdigest()[:16]


def for_object_store(weights):
    """``weights`` as a task's argument: a Hessian without its spill folder, so that its U travels in
    Ray's object store (put once per matrix) rather than as a path to this machine's temporary folder,
    which another node need not see (gptq.Hessian.__getstate__)."""
    if getattr(weights, "spill", None) is not None:
        return dataclasses.replace(weights, spill=None)
    return weights


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}" if not isinstance(e, GgufqError) else (text[0] if text else "")


def probe(model_dir: str) -> dict:
    """What a node says about itself (runs as a Ray task on each node)."""
    info = {"host": socket.gethostname(), "version": __version__, "code": code_digest()}
    try:
        info["model"] = model_digest(model_dir)
    except BaseException as e:  # noqa: BLE001 -- reported to the driver as one line
        info["error"] = _one_line(e)
    return info


# per worker process: model folder -> (digest, {name: OutTensor}), the folder opened once
_WORKER_MODELS: dict = {}


def _worker_tensor(model_dir: str, digest: str, name: str, shape: tuple):
    got = _WORKER_MODELS.get(model_dir)
    if got is None:
        from . import blas
        from .convert import prepare
        blas.one_thread()                      # the tasks are the parallelism, as in the local pool
        mine = model_digest(model_dir)
        p = prepare(model_dir)
        p.model.__enter__()                    # one descriptor per shard for this worker's life
        got = _WORKER_MODELS[model_dir] = (mine, {t.name: t for t in p.tensors})
    mine, tensors = got
    if mine != digest:
        raise GgufqError(f"node {socket.gethostname()} reads another model at {model_dir} "
                         f"(digest {mine}, the driver's {digest})")
    t = tensors.get(name)
    if t is None or tuple(t.shape) != tuple(shape):
        raise GgufqError(f"node {socket.gethostname()}: {model_dir} has no tensor {name} of shape {shape}")
    return t


def encode_task(model_dir: str, digest: str, encoder, name: str, shape: tuple, qtype: int, lo: int, hi: int,
                weights, allow_nonfinite: bool):
    """One chunk on a Ray worker: the job function of the local pool on this worker's own read."""
    from gguf import GGMLQuantizationType as T

    from .write import Job, encode_chunk
    job = Job(_worker_tensor(model_dir, digest, name, shape), T(qtype))
    return encode_chunk(encoder, job, lo, hi, weights, allow_nonfinite)


@dataclass
class Node:
    node_id: str
    label: str
    cpus: int


class _Result:
    """A task's result, fetched by :meth:`result` (the writer's window asks in file order)."""

    def __init__(self, ref, executor: "RayExecutor"):
        self.ref = ref
        self.executor = executor

    def result(self):
        import ray
        try:
            out = ray.get(self.ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, GgufqError):
                raise GgufqError(str(cause).strip().splitlines()[0]) from None
            raise GgufqError(f"an encoding task failed on the cluster: {_one_line(cause or e)}") from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError) as e:
            raise GgufqError(f"an encoding task was lost {MAX_RETRIES + 1} times (workers or nodes died: "
                             f"{type(e).__name__}); nothing was written") from None
        except ray.exceptions.RayError as e:
            raise GgufqError(f"the Ray cluster failed an encoding task: {_one_line(e)}") from None
        finally:
            self.executor._inflight.discard(self.ref)
        return out


class RayExecutor:
    """The writer's pool on a Ray cluster (see the module docstring); from :func:`connect`."""

    def __init__(self, address: str, model_dir: str, digest: str, nodes: list[Node]):
        self.address = address
        self.model_dir = model_dir
        self.digest = digest
        self.nodes = nodes
        self.cpus = sum(n.cpus for n in nodes)
        self.window = 2 * max(1, self.cpus)
        self._inflight: set = set()
        self._remote = None
        self._weights = (None, None)          # the last importance put into the object store, its ref
        self._open = True

    def describe(self) -> str:
        return f"Ray cluster at {self.address}: {len(self.nodes)} nodes, {self.cpus} CPUs"

    def submit_chunk(self, encoder, job, lo: int, hi: int, weights, allow_nonfinite: bool) -> _Result:
        import ray
        if self._remote is None:
            self._remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(encode_task)
        if weights is not None and not isinstance(weights, (int, float)):
            obj, ref = self._weights           # one object per importance (a Hessian is large), not per chunk
            if obj is not weights:
                # a Hessian's U goes through the object store: its spill file (gptq.Hessian.__getstate__)
                # sits in this machine's temporary folder, which another node need not see
                ref = ray.put(for_object_store(weights))
                self._weights = (weights, ref)
            weights = ref
        ref = self._remote.remote(self.model_dir, self.digest, encoder, job.tensor.name, tuple(job.tensor.shape),
                                  int(job.qtype), lo, hi, weights, allow_nonfinite)
        self._inflight.add(ref)
        return _Result(ref, self)

    def close(self, ok: bool = True) -> None:
        """Cancel what is still running (``ok=False``) and leave the cluster."""
        if not self._open:
            return
        self._open = False
        import ray
        from .procs import deferred
        with deferred(raise_at_exit=False):
            for ref in list(self._inflight):
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 -- already finished or gone
                    pass
            self._inflight.clear()
            self._weights = (None, None)
            _shutdown()


def _shutdown() -> None:
    import ray
    handlers = {s: signal.getsignal(s) for s in _signals()}
    try:
        ray.shutdown()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _signals():
    from .procs import SIGNALS
    return SIGNALS


def _reachable(address: str) -> None:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise GgufqError(f"cannot reach the Ray cluster at {address} ({why}); start one with "
                         "`ray start --head` or check --executor ray://HOST:PORT") from None


def _init(address: str) -> None:
    import ray
    handlers = {s: signal.getsignal(s) for s in _signals()}
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, namespace="ggufq",
                 ignore_reinit_error=True)
    except ConnectionError as e:
        where = "(--executor ray: this machine's cluster, or $RAY_ADDRESS)" if address == "auto" else f"at {address}"
        raise GgufqError(f"cannot join a Ray cluster {where}: {_one_line(e)}") from None
    except (RuntimeError, ValueError) as e:
        raise GgufqError(f"cannot join the Ray cluster at {address}: {_one_line(e)}") from None
    finally:
        for s, h in handlers.items():       # ray.init sets its own SIGTERM handler (sys.exit)
            signal.signal(s, h)


def check_probe(label: str, info: dict, mine: dict, model_dir: str) -> None:
    """GgufqError (one line naming the node) unless a node's :func:`probe` answer matches this machine's."""
    if info["version"] != mine["version"]:
        raise GgufqError(f"Ray node {label} runs ggufq {info['version']}, this machine {mine['version']}; "
                         "install the same ggufq on every node")
    if info["code"] != mine["code"]:
        raise GgufqError(f"Ray node {label} runs other ggufq code (digest {info['code']}, here "
                         f"{mine['code']}) of the same version {mine['version']}; install the same ggufq on every node")
    if "error" in info:
        raise GgufqError(f"Ray node {label} cannot read the model at {model_dir}: {info['error']} "
                         "(every node needs the folder at the same path)")
    if info["model"] != mine["model"]:
        raise GgufqError(f"Ray node {label} sees another model at {model_dir} (its tensors or file "
                         "sizes differ from this machine's)")


def connect(executor: str, model_dir: os.PathLike | str) -> RayExecutor:
    """Join the cluster and probe every node with CPUs; GgufqError (one line) when the cluster cannot be
    reached, a node cannot read ``model_dir``, or runs another ggufq. Nothing is written here.

    Long because each refusal (address, Ray missing, no CPUs, timeout, version, code, model) is one
    line here, before any byte is written, and they read best in the order they are checked."""
    address = parse(executor)
    if address is None:
        raise ValueError("not a Ray executor")
    if not available():
        raise GgufqError(MISSING)
    if address != "auto":
        _reachable(address)
    # Ray retries a GCS that accepts TCP but does not answer (a wrong port) ~20 times, each attempt
    # waiting ~40 s, inside C++ (no Ctrl-C): one attempt here (~40 s), unless the user set the budget
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "1")
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    model_dir = str(Path(model_dir).resolve())
    _init(address)
    ok = False
    try:
        nodes = [Node(n["NodeID"], f"{n.get('NodeManagerHostname') or n['NodeManagerAddress']} "
                      f"({n['NodeManagerAddress']}, node {n['NodeID'][:8]})", int(n["Resources"].get("CPU", 0)))
                 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]
        if not nodes:
            raise GgufqError(f"the Ray cluster at {address} has no node with a CPU to run tasks on")
        task = ray.remote(num_cpus=0, max_retries=0)(probe)
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False))
                .remote(model_dir) for n in nodes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PROBE_TIMEOUT)
        mine = {"version": __version__, "code": code_digest(), "model": model_digest(model_dir)}
        for n, ref in zip(nodes, refs):
            if ref not in ready:
                raise GgufqError(f"Ray node {n.label} did not answer the probe within {PROBE_TIMEOUT:g} s")
            try:
                info = ray.get(ref)
            except ray.exceptions.RayError as e:
                raise GgufqError(f"Ray node {n.label}: the probe failed ({_one_line(getattr(e, 'cause', None) or e)}); "
                                 "is ggufq installed there?") from None
            check_probe(n.label, info, mine, model_dir)
        ex = RayExecutor(address, model_dir, mine["model"], nodes)
        ok = True
        return ex
    finally:
        if not ok:
            _shutdown()
