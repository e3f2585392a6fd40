"""Runs a tf.data service server, so training input can be decoded on separate CPU machines.

Start one dispatcher, then any number of workers (each on a machine with spare cores and access to
the records), then train with --data_service=grpc://DISPATCHER_HOST:PORT. The dispatcher hands
whole shard files to the workers on demand (dynamic sharding: within one pass over the data each
file goes to exactly one worker; files a worker was reading when it died are not handed out again,
so a pass is at-most-once under failures). Every trainer of one run shares one job, so each batch
reaches exactly one trainer. Validation never goes through the service (it stays exactly-once).
Runs until killed (a worker also stops, after --dispatcher_timeout, when its dispatcher is gone).

Security: the port is unauthenticated and listens on every interface (TensorFlow offers no choice
of interface and no authentication): anyone who can reach it can register a worker or a trainer and
receive the training images. Run it inside a private network or behind a firewall.

Example:
  data_service --role=dispatcher --port=5050
  data_service --role=worker --dispatcher_address=cpu0:5050 --port=5051 \
      --worker_address=cpu1:5051
"""

from absl import app
from absl import flags

from skinrecords.cli import common as cli_common

_ROLE = flags.DEFINE_enum("role", None, ["dispatcher", "worker"], "dispatcher: the one server "
                          "trainers connect to; worker: runs input pipelines for it.")
_PORT = flags.DEFINE_integer("port", 0, "Port to listen on; 0 picks a free one (printed at "
                             "start). Trainers reach the dispatcher, and the dispatcher and "
                             "trainers reach each worker, on this port.")
_DISPATCHER = flags.DEFINE_string("dispatcher_address", "", "Worker only: the dispatcher's "
                                  "host:port (grpc:// optional).")
_WORKER_ADDRESS = flags.DEFINE_string("worker_address", "", "Worker only: the address trainers "
                                      "use to reach this worker, %port% standing for --port "
                                      "(e.g. cpu1:%port%); default: this host's name:%port%.")
_WORK_DIR = flags.DEFINE_string("work_dir", "", "Dispatcher only: a folder for its journal, so a "
                                "restarted dispatcher recovers its jobs (fault-tolerant mode); "
                                "empty: state is lost on restart.")
_DISPATCHER_TIMEOUT = flags.DEFINE_float("dispatcher_timeout", 300.0, "Worker only: seconds the "
                                         "dispatcher may be unreachable, at start or later, "
                                         "before this worker gives up (exit 1 with one line); a "
                                         "line every 10 s meanwhile.")
flags.mark_flag_as_required("role")


def _configs() -> tuple:
  from skinrecords.input import data_service  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return (data_service.DataServiceConfig,)


# Every DataServiceConfig field is the flag of its name (cli_common.ConfigFlags;
# tests/test_help.py), but this one:
_NOT_FLAGS = {"progress_interval": "the seconds between waiting lines; tests shorten it"}
_CONFIG_FLAGS = cli_common.ConfigFlags(globals(), _configs, "data_service", _NOT_FLAGS)



def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from skinrecords.core import waiting  # pylint: disable=g-import-not-at-top

  try:  # before TensorFlow loads (seconds): a port in use is said at once
    waiting.check_port_free(_PORT.value, f"tf.data service {_ROLE.value}")
  except ValueError as err:
    raise app.UsageError(str(err)) from err
  from skinrecords.input import data_service  # pylint: disable=g-import-not-at-top

  config = _CONFIG_FLAGS.build(data_service.DataServiceConfig,
                               progress_interval=data_service.DataServiceConfig.progress_interval)
  try:
    config.validate()
    server = data_service.start_server(config)
  except ValueError as err:
    raise app.UsageError(str(err)) from err
  return data_service.serve(config, server)


def run():
  """Console entry point (`skinrecords-data-service`)."""
  cli_common.run(main, "skinrecords-data-service")


if __name__ == "__main__":
  run()
