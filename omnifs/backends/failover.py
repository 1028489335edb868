"""``type = "failover"``: changes go to the first healthy remote; the others follow through repair.

The first remote in ``remotes`` is the primary.  Every change is applied to the
first healthy remote that is up to date for the path and logged for the others
(see ``omnifs.backends.replicas``); a background task copies it to them, so the
secondaries are asynchronous standbys.  A remote that does not answer a call
within ``op_timeout`` (plus time for the data of a read or write) is marked
down and the call is repeated on the next one, so a change moves to the
secondary within about two seconds.  When the primary answers again, what was
written elsewhere meanwhile is copied back before it serves those paths again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from omnifs.backends.base import Backend, Option
from omnifs.backends.replicas import DEFAULT_OP_TIMEOUT, OptionProblem, ReplicaSet, check_remotes


class FailoverBackend(ReplicaSet):
    """Failover over ``children`` in order; one acknowledgement makes a change durable."""

    type_name = "failover"
    options: ClassVar[Mapping[str, Option]] = {
        "remotes": Option(list, required=True, help="names of other remotes, primary first"),
        "op_timeout": Option(
            float, default=DEFAULT_OP_TIMEOUT, help="seconds of silence after which a remote counts as down"
        ),
    }
    sync_all = False

    def __init__(
        self,
        name: str,
        children: Sequence[Backend],
        *,
        log_dir: Path | None = None,
        op_timeout: float = DEFAULT_OP_TIMEOUT,
    ) -> None:
        super().__init__(name, children, log_dir=log_dir, op_timeout=op_timeout, required=1)

    @classmethod
    def check_options(cls, opts: Mapping[str, Any]) -> OptionProblem | None:
        """Problems the type check cannot see (reported by the config loader)."""
        problem = check_remotes(opts.get("remotes"))
        if problem is None and float(opts.get("op_timeout", DEFAULT_OP_TIMEOUT)) <= 0:
            problem = OptionProblem("op_timeout", "'op_timeout' must be positive")
        return problem

    @classmethod
    def from_options(cls, name: str, opts: Mapping[str, Any]) -> Backend:
        return cls(name, opts["children"], op_timeout=float(opts.get("op_timeout", DEFAULT_OP_TIMEOUT)))
