"""moto's server, with two speed fixes to its SQS backend that keep its answers the same, and
ELBv2 target health modelled on AWS's (elbv2_health.py; moto reports targets healthy and gone at
once, which would make every load-balancer wait of a drain trivial).

moto 5.2.5 scans the whole queue more often than it needs to, and slowly:
- ReceiveMessage checks every message it returns against the queue's retention period by
  computing every queue attribute, ApproximateNumberOfMessages included, which walks the whole
  queue. A receive of 10 from a queue of 200 took about 80 ms.
- Each scan asks the time once per message through datetime arithmetic (`unix_time`).
So a burst of 200 spot warnings took 1.7 s to leave moto, where real SQS takes milliseconds, and
the sandbox measured moto instead of the controller. With these fixes, the same 200 receives take
about 0.1 s (see docs/performance.md).

Run as: python sandbox/moto/server.py [moto_server arguments]
"""

import sys
import time

import moto.sqs.models as sqs_models

import elbv2_health

_unix_time_of = sqs_models.unix_time


def _unix_time(dt=None):
    # The same number moto computes (seconds since the epoch, UTC), without datetime arithmetic.
    return time.time() if dt is None else _unix_time_of(dt)


def _unix_time_millis(dt=None):
    return _unix_time(dt) * 1000.0


def _within_retention_period(self, queue_name, message):
    queue = self.get_queue(queue_name)
    return int(queue.message_retention_period) + message.sent_timestamp / 1000 > _unix_time()


sqs_models.unix_time = _unix_time
sqs_models.unix_time_millis = _unix_time_millis
sqs_models.SQSBackend.is_message_valid_based_on_retention_period = _within_retention_period

elbv2_health.install()


def _name_process(name):
    # Keeps the process's command name "moto_server", as `ps` and the benchmarks' CPU table
    # know it, instead of "python".
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    from moto.server import main

    _name_process("moto_server")

    sys.exit(main())
