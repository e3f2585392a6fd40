"""Choosing a tf.distribute strategy, mixed precision, which process writes files, and the cluster.

MultiWorkerMirroredStrategy must be created before any other TensorFlow op runs, with TF_CONFIG
already set ("Collective ops must be configured at program startup", tensorflow#34568), so the
binaries build TF_CONFIG (`tf_config_from_hosts`, `tf_config_from_slurm`) and then call
`make_strategy` first thing. What each worker reads under a strategy is `feeding`'s; the XLA
policy is `xla`'s.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
from typing import NamedTuple

import tensorflow as tf

from skinrecords.core import fileio
from skinrecords.core import waiting
from skinrecords.input import data_service

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
MIXED_PRECISION = ("auto", "on", "off")
_MIRRORED_COUNT = itertools.count()
# How long a multi-worker process waits for its peers at start (--cluster_timeout), and how often
# it says which ones it is waiting for. Workers started by hand or by a scheduler on several hosts
# can come up minutes apart; TensorFlow's own wait is unbounded.
CLUSTER_TIMEOUT_S = 600.0
CLUSTER_PROGRESS_S = 10.0


def make_strategy(name: str = "auto", cluster_timeout: float = CLUSTER_TIMEOUT_S,
                  progress_interval: float = CLUSTER_PROGRESS_S) -> tf.distribute.Strategy:
  """auto: MirroredStrategy over all GPUs when there are several, else one device (GPU or CPU).

  Without GPUs, `mirrored` mirrors over the logical CPU devices (the tests make two of them to stand
  in for two GPUs). `multi_worker` reads the cluster from TF_CONFIG (no TF_CONFIG: one worker) and
  mirrors over this host's GPUs, or its CPU; it waits at most `cluster_timeout` seconds for the
  other workers (`start_multi_worker`).
  """
  if name not in STRATEGIES:
    raise ValueError(f"strategy={name!r}; choose one of {', '.join(STRATEGIES)}")
  if name == "multi_worker":
    return start_multi_worker(cluster_timeout, progress_interval)
  gpus = tf.config.list_logical_devices("GPU")
  devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
  if name == "mirrored" or (name == "auto" and len(gpus) > 1):
    # Every MirroredStrategy starts its collective group and instance keys from the same class
    # attribute (0), so a second one in the same process (a notebook training fold after fold, a
    # test suite) reuses the first one's keys, which the collective runtime has cached: "Shape
    # mismatch in the collective instance 102 ... expected shape [32] but another member in the
    # group expected shape [8]". TensorFlow's own tests move this (private) base by 100000 per
    # strategy; so do we.
    setattr(tf.distribute.MirroredStrategy, "_collective_key_base",
            100000 * next(_MIRRORED_COUNT))
    return tf.distribute.MirroredStrategy(devices)
  return tf.distribute.OneDeviceStrategy(devices[0])


def cluster_peers(tf_config: str) -> tuple[waiting.Peer | None, list[waiting.Peer]]:
  """(this task, the other tasks) of a TF_CONFIG JSON; (None, []) without one (a single worker)."""
  if not tf_config:
    return None, []
  config = json.loads(tf_config)
  task = config.get("task", {})
  me, peers = None, []
  for job, hosts in config.get("cluster", {}).items():
    for i, address in enumerate(hosts):
      host, port = data_service.parse_address(address, f"TF_CONFIG {job} {i}")
      peer = waiting.Peer(f"{job} {i}", host, port)
      if job == task.get("type") and i == task.get("index"):
        me = peer
      elif job in ("chief", "worker"):  # evaluators and parameter servers do not all-reduce
        peers.append(peer)
  return me, peers


def start_multi_worker(timeout: float = CLUSTER_TIMEOUT_S,
                       interval: float = CLUSTER_PROGRESS_S) -> tf.distribute.Strategy:
  """MultiWorkerMirroredStrategy from TF_CONFIG, after a bounded, interruptible wait for the peers
  (`waiting.rendezvous`: this task's port in use is a ValueError, absent peers a line every
  `interval` s, then `waiting.WaitTimeout` after `timeout` s). Prints the open-port line first."""
  me, peers = cluster_peers(os.environ.get("TF_CONFIG", ""))
  if me is None:
    return tf.distribute.MultiWorkerMirroredStrategy()
  print(waiting.security_note(me.port, f"multi-worker gRPC server of {me.label}",
                              "join the cluster and read the model and the training batches"),
        file=sys.stderr, flush=True)
  waiting.rendezvous(me, peers, timeout, interval, "--cluster_timeout")
  return tf.distribute.MultiWorkerMirroredStrategy()


def use_mixed_precision(setting: str) -> bool:
  """Whether `setting` resolves to a mixed policy on this machine (resolve_mixed_precision)."""
  return resolve_mixed_precision(setting).policy != "float32"


# CPU flags (Linux /proc/cpuinfo names) of native low-precision matmuls that oneDNN uses.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
NATIVE_FP16_CPU_FLAGS = ("avx512_fp16", "amx_fp16")


class Precision(NamedTuple):
  policy: str  # the Keras dtype policy: float32, mixed_float16 or mixed_bfloat16
  reason: str  # why, for the log line
  warning: str = ""  # set when the choice is known to be slow on this hardware


def cpu_flags() -> frozenset:
  """This CPU's feature flags from /proc/cpuinfo (empty where there is none: then no native
  low precision is assumed, which only costs speed)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def gpu_compute_capabilities() -> list:
  """(major, minor) per visible GPU; (0, 0) where TensorFlow does not say."""
  caps = []
  for gpu in tf.config.list_physical_devices("GPU"):
    details = tf.config.experimental.get_device_details(gpu)
    caps.append(tuple(details.get("compute_capability") or (0, 0)))
  return caps


def resolve_mixed_precision(setting: str, gpu_capabilities=None, flags=None) -> Precision:
  """The Keras dtype policy for `--mixed_precision` on this machine (or the GPUs/CPU flags given).

  GPUs: float16 where every GPU has tensor cores (compute capability >= 7.0), with loss scaling;
  bfloat16 (>= 8.0) is as fast there and unmeasured by us, so float16 stays. CPU: bfloat16 only
  where the CPU multiplies it natively (AVX512-BF16 / AMX-BF16): there a fused-BN DenseNet121 step
  took 0.41 s against 0.61 s in float32 (FIELD_NOTES). Without those instructions oneDNN emulates
  low precision and a step runs several times slower (simple_cnn 64 px ~6x, issue 27): auto keeps
  float32 and `on` warns.
  """
  if setting not in MIXED_PRECISION:
    raise ValueError(f"mixed_precision={setting!r}; choose one of {', '.join(MIXED_PRECISION)}")
  if setting == "off":
    return Precision("float32", "mixed_precision=off")
  caps = gpu_compute_capabilities() if gpu_capabilities is None else list(gpu_capabilities)
  if caps:
    shown = ", ".join(f"{major}.{minor}" for major, minor in caps)
    tensor_cores = all(tuple(c) >= (7, 0) for c in caps)
    if setting == "auto" and not tensor_cores:
      return Precision("float32", f"mixed_precision=auto: GPU compute capability {shown} < 7.0 "
                       "has no float16 tensor cores")
    warning = "" if tensor_cores else (
        f"--mixed_precision=on: GPU compute capability {shown} < 7.0 has no float16 tensor "
        "cores, so float16 may be slower than float32; use --mixed_precision=auto or off")
    return Precision("mixed_float16", f"mixed_precision={setting}: GPU compute capability "
                     f"{shown}", warning)
  flags = cpu_flags() if flags is None else frozenset(flags)
  bf16 = sorted(flags & set(NATIVE_BF16_CPU_FLAGS))
  if bf16:
    return Precision("mixed_bfloat16", f"mixed_precision={setting}: the CPU has "
                     f"{', '.join(bf16)}")
  if setting == "auto":
    return Precision("float32", "mixed_precision=auto: the CPU has no native bfloat16 "
                     f"({' or '.join(NATIVE_BF16_CPU_FLAGS)})")
  if flags & set(NATIVE_FP16_CPU_FLAGS):
    return Precision("mixed_float16", "mixed_precision=on: the CPU has native float16")
  return Precision("mixed_float16", "mixed_precision=on on a CPU without native low precision",
                   "--mixed_precision=on: this CPU has no native bfloat16 or float16 (no "
                   f"{', '.join(NATIVE_BF16_CPU_FLAGS + NATIVE_FP16_CPU_FLAGS)}), so mixed "
                   "precision runs several times slower than float32 here; use "
                   "--mixed_precision=auto (float32 on this CPU)")


def replica_devices(strategy: tf.distribute.Strategy) -> list[str]:
  return list(strategy.extended.worker_devices)


def _multi_worker_task(strategy) -> tuple[dict, str | None, int | None]:
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return {}, None, None
  return resolver.cluster_spec().as_dict(), resolver.task_type, resolver.task_id


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True for the one process that writes results (always true outside multi-worker training)."""
  cluster, task_type, task_id = _multi_worker_task(strategy)
  if task_type is None:
    return True
  if "chief" in cluster:
    return task_type == "chief"
  return task_type == "worker" and task_id == 0


def num_workers(strategy: tf.distribute.Strategy) -> int:
  """Processes taking part in training (chief included); 1 outside multi-worker training."""
  cluster, _, _ = _multi_worker_task(strategy)
  return max(1, len(cluster.get("chief", ())) + len(cluster.get("worker", ())))


def task_name(strategy: tf.distribute.Strategy) -> str:
  """"worker 1", "chief 0", or "local" (for log lines)."""
  _, task_type, task_id = _multi_worker_task(strategy)
  return "local" if task_type is None else f"{task_type} {task_id}"


class ChiefOutputDir:
  """Where this process writes: the real folder on the chief, a temporary one elsewhere.

  Keras 3's ModelCheckpoint and BackupAndRestore have no chief logic (every worker writes the same
  file); the old tf.keras wrote non-chief copies to temporary paths, which collective saving still
  needs (every worker must take part in a save). `cleanup()` removes the temporary copy. The
  temporary folder's name carries `tag` and a hash of model_dir, so a restarted worker also removes
  what a killed predecessor (SIGKILL runs no cleanup) left behind.

  `dir` is a str (model_dir may be gs://...); `join(name)` is where file `name` goes. The
  temporary folders of non-chief workers are always local.
  """

  def __init__(self, model_dir: str | os.PathLike, chief: bool, tag: str = "worker"):
    self.chief = chief
    model_dir = os.fspath(model_dir)
    if chief:
      self.dir = model_dir
      fileio.makedirs(self.dir)
      return
    key = hashlib.sha256(fileio.canonical(model_dir).encode()).hexdigest()[:12]
    prefix = f"skinrecords_{re.sub(r'[^A-Za-z0-9]+', '', tag)}_{key}_"
    for stale in fileio.glob(fileio.join(tempfile.gettempdir(), prefix + "*")):
      st = os.lstat(stale)
      if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():  # lstat: never follow a link
        _remove_quietly(stale)
    self.dir = tempfile.mkdtemp(prefix=prefix)

  def join(self, *names: str) -> str:
    return fileio.join(self.dir, *names)

  def cleanup(self) -> None:
    if not self.chief:
      _remove_quietly(self.dir)


def _remove_quietly(folder: str) -> None:
  """Removes a local temporary folder; one left behind is only clutter in /tmp."""
  try:
    fileio.rmtree(folder)
  except OSError as err:
    logging.info("could not remove %s: %s", folder, err)


def tf_config_from_hosts(worker_hosts: list[str], task_index: int) -> str:
  """The TF_CONFIG JSON for `--worker_hosts=h1:p,h2:p --task_index=i` (worker 0 is the chief)."""
  if not worker_hosts:
    raise ValueError("worker_hosts is empty; give host:port for every worker, e.g. "
                     "h1:12345,h2:12345")
  for host in worker_hosts:
    if not data_service.ADDRESS.match(host) or host.startswith("grpc://"):
      raise ValueError(f"worker host {host!r} is not host:port (e.g. 10.0.0.2:12345)")
    if not 0 < int(host.rsplit(":", 1)[1]) < 65536:
      raise ValueError(f"worker host {host!r}: the port must be within 1..65535")
  if len(set(worker_hosts)) != len(worker_hosts):
    raise ValueError(f"worker_hosts {','.join(worker_hosts)} lists an address twice")
  if not 0 <= task_index < len(worker_hosts):
    raise ValueError(f"task_index={task_index} outside 0..{len(worker_hosts) - 1} for "
                     f"{len(worker_hosts)} worker hosts")
  return json.dumps({"cluster": {"worker": list(worker_hosts)},
                     "task": {"type": "worker", "index": task_index}})


def tf_config_from_slurm(port_base: int = 8888) -> str:
  """The TF_CONFIG JSON for this task of a SLURM job step (`srun`), via SlurmClusterResolver.

  Task i of the step is worker i (worker 0, the chief, is SLURM_PROCID 0); tasks on one node take
  ports port_base, port_base + 1, .... The resolver also shares the node's GPUs between its tasks
  by setting CUDA_VISIBLE_DEVICES, which must happen before TensorFlow touches a GPU — hence before
  `make_strategy`. GPUs per node come from SLURM_GPUS_ON_NODE or CUDA_VISIBLE_DEVICES, else the
  resolver asks nvidia-smi. Raises ValueError outside a SLURM job step.
  """
  resolver_lib = tf.distribute.cluster_resolver
  missing = [v for v in ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
                         "SLURM_STEP_TASKS_PER_NODE") if v not in os.environ]
  if missing:
    raise ValueError(f"cluster=slurm but {', '.join(missing)} not set: start the workers with "
                     "srun inside an sbatch/salloc allocation")
  gpus = os.environ.get("SLURM_GPUS_ON_NODE")
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if gpus is None and visible is None and not shutil.which("nvidia-smi"):
    gpus = "0"  # a CPU node: nvidia-smi is absent and the resolver would fail looking for it
  kwargs = {}
  if gpus is not None and gpus.strip() == "0":
    # With 0 GPUs the resolver's per-node loop `range(0, gpus_per_node, gpus_per_task)` has step 0
    # and fails; a virtual count of one "GPU" per task keeps every task, and auto_set_gpu=False
    # leaves CUDA_VISIBLE_DEVICES alone.
    kwargs = {"gpus_per_node": 1024, "gpus_per_task": 1, "auto_set_gpu": False}
  try:
    if gpus is not None and not kwargs:
      kwargs = {"gpus_per_node": int(gpus)}
    resolver = resolver_lib.SlurmClusterResolver(port_base=port_base, **kwargs)
    cluster = resolver.cluster_spec().as_dict()
  except (RuntimeError, ValueError, KeyError) as err:
    raise ValueError(f"could not resolve the SLURM cluster from SLURM_* variables "
                     f"(SLURM_STEP_NODELIST={os.environ['SLURM_STEP_NODELIST']!r}, "
                     f"SLURM_GPUS_ON_NODE={gpus!r}): {err}") from err
  # The resolver numbers a node's GPUs 0..n-1; where SLURM already narrowed the visible devices
  # (CUDA_VISIBLE_DEVICES=4,5,6,7 without device cgroups), index into that list instead.
  chosen = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible and chosen and chosen != visible:
    ids = visible.split(",")
    if all(i.isdigit() and int(i) < len(ids) for i in chosen.split(",")):
      os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[int(i)] for i in chosen.split(","))
  return json.dumps({"cluster": cluster,
                     "task": {"type": resolver.task_type, "index": resolver.task_id}})


def configure_cluster(strategy: str, cluster: str = "tf_config", worker_hosts=None,
                      task_index: int | None = None, slurm_port_base: int = 8888) -> str | None:
  """Sets TF_CONFIG from worker hosts or SLURM for `strategy="multi_worker"` and returns it.

  Must run before TensorFlow runs any op (tensorflow#34568). ValueError names the conflicting
  settings: cluster flags without multi_worker, hosts without a task index, TF_CONFIG and hosts
  both given.
  """
  multi = strategy == "multi_worker"
  given = [f for f, on in (("worker_hosts", worker_hosts), ("task_index", task_index is not None),
                           ("cluster=slurm", cluster == "slurm")) if on]
  if given and not multi:
    raise ValueError(f"{', '.join(given)} given with strategy={strategy}; use "
                     "strategy=multi_worker")
  if worker_hosts or task_index is not None:
    if cluster == "slurm":
      raise ValueError("cluster=slurm takes the cluster from SLURM; drop worker_hosts and "
                       "task_index")
    if not worker_hosts or task_index is None:
      raise ValueError(f"worker_hosts and task_index go together (got worker_hosts="
                       f"{worker_hosts}, task_index={task_index})")
    if os.environ.get("TF_CONFIG"):
      raise ValueError("TF_CONFIG is set and worker_hosts given: use one or the other")
    os.environ["TF_CONFIG"] = tf_config_from_hosts(worker_hosts, task_index)
  elif cluster == "slurm":
    os.environ["TF_CONFIG"] = tf_config_from_slurm(slurm_port_base)
  return os.environ.get("TF_CONFIG") if multi else None


def log_strategy(strategy: tf.distribute.Strategy) -> None:
  logging.info("strategy %s with %d replica(s) on %d worker(s); this is %s%s",
               type(strategy).__name__, strategy.num_replicas_in_sync, num_workers(strategy),
               task_name(strategy), " (chief)" if is_chief(strategy) else "")


def same_on_all_workers(strategy: tf.distribute.Strategy, value: int) -> bool:
  """Whether every worker holds `value` (one all-gather, so also a barrier)."""
  per_worker = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant([value], tf.int64))
  values = strategy.gather(per_worker, axis=0).numpy()
  return int(values.min()) == int(values.max())


def weights_digest(weights) -> str:
  """sha256 over the bytes of every weight array, in order: equal digests mean equal weights."""
  digest = hashlib.sha256()
  for w in weights:
    digest.update(w.tobytes())
  return digest.hexdigest()
