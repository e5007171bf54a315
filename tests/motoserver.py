"""The suite's moto server: ``python -m moto.server`` with SQS FIFO groups made exclusive.

moto's ReceiveMessage checks which FIFO groups are in flight and marks its messages received
without a lock, in a threaded HTTP server: two receivers at once can both be handed messages
of one group, even out of order. Real SQS never does that ("no more messages for the same
message group ID are returned unless you delete the message or it becomes visible"), and
branchbuild's per-branch order rests on it. Here every receive, delete and visibility change
runs under one lock; a long poll waits outside it.
``tests/test_queue.py::test_moto_never_hands_one_fifo_group_to_two_receivers`` holds it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from moto.server import main
from moto.sqs.models import Message, SQSBackend

_LOCK = threading.RLock()
_receive = SQSBackend.receive_message


def _receive_message(
    self: SQSBackend,
    queue_name: str,
    count: int,
    wait_seconds_timeout: int,
    visibility_timeout: int,
    message_attribute_names: list[str] | None = None,
) -> list[Message]:
    deadline = time.monotonic() + wait_seconds_timeout
    while True:
        with _LOCK:
            result = _receive(
                self, queue_name, count, 0, visibility_timeout, message_attribute_names
            )
        remaining = deadline - time.monotonic()
        if result or remaining <= 0:
            return result
        condition = self.get_queue(queue_name)._messages_lock
        with condition:  # woken by a send; a visibility change is seen within 0.1 s
            condition.wait(timeout=min(0.1, remaining))


def _locked(name: str) -> None:
    original = getattr(SQSBackend, name)

    def call(self: SQSBackend, *args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return original(self, *args, **kwargs)

    setattr(SQSBackend, name, call)


SQSBackend.receive_message = _receive_message  # type: ignore[method-assign]
for _name in ("delete_message", "change_message_visibility"):
    _locked(_name)

if __name__ == "__main__":
    main()
