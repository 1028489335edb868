"""``type = "mirror"``: every change goes to every healthy remote at once.

``policy`` says how many acknowledgements make a change durable: ``"all"``
(every remote in ``remotes``), ``"quorum"`` (``quorum`` of them) or
``"best-effort"`` (one).  A change that cannot reach that many fails with EIO
before anything is changed when too few remotes are up; one that reaches
fewer than needed because some stopped answering fails too, but what did land
is kept and spread to the rest by repair.  Remotes that missed changes are
repaired from the log in order (see ``omnifs.backends.replicas``) and serve
no path they are behind on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from omnifs.backends.base import Backend, Option
from omnifs.backends.replicas import DEFAULT_OP_TIMEOUT, OptionProblem, ReplicaSet, check_remotes

Policy = Literal["all", "quorum", "best-effort"]
POLICIES: tuple[str, ...] = get_args(Policy)


def required_acks(policy: str, quorum: int | None, count: int) -> int:
    """Acknowledgements a change needs under ``policy`` with ``count`` remotes."""
    if policy == "all":
        return count
    if policy == "quorum":
        return quorum if quorum is not None else count // 2 + 1
    return 1


class MirrorBackend(ReplicaSet):
    """Mirror over ``children``; ``required`` acknowledgements make a change durable."""

    type_name = "mirror"
    options: ClassVar[Mapping[str, Option]] = {
        "remotes": Option(list, required=True, help="names of other remotes; reads prefer the first"),
        "policy": Option(str, default="all", help='"all", "quorum" or "best-effort"'),
        "quorum": Option(int, help="acknowledgements needed with policy quorum (default: a majority)"),
        "op_timeout": Option(
            float, default=DEFAULT_OP_TIMEOUT, help="seconds of silence after which a remote counts as down"
        ),
    }
    sync_all = True

    def __init__(
        self,
        name: str,
        children: Sequence[Backend],
        *,
        policy: Policy = "all",
        quorum: int | None = None,
        log_dir: Path | None = None,
        op_timeout: float = DEFAULT_OP_TIMEOUT,
    ) -> None:
        self.policy = policy
        required = required_acks(policy, quorum, len(children))
        super().__init__(name, children, log_dir=log_dir, op_timeout=op_timeout, required=required)

    @classmethod
    def check_options(cls, opts: Mapping[str, Any]) -> OptionProblem | None:
        """Problems the type check cannot see (reported by the config loader)."""
        problem = check_remotes(opts.get("remotes"))
        if problem is not None:
            return problem
        policy = opts.get("policy", "all")
        if policy not in POLICIES:
            return OptionProblem("policy", f"unknown policy {policy!r} (known: {', '.join(POLICIES)})")
        quorum = opts.get("quorum")
        if quorum is not None:
            if policy != "quorum":
                return OptionProblem("quorum", f"'quorum' only applies to policy \"quorum\", not {policy!r}")
            if not 1 <= quorum <= len(opts["remotes"]):
                return OptionProblem(
                    "quorum", f"quorum {quorum} is not between 1 and the number of remotes ({len(opts['remotes'])})"
                )
        if float(opts.get("op_timeout", DEFAULT_OP_TIMEOUT)) <= 0:
            return OptionProblem("op_timeout", "'op_timeout' must be positive")
        return None

    @classmethod
    def from_options(cls, name: str, opts: Mapping[str, Any]) -> Backend:
        return cls(
            name,
            opts["children"],
            policy=opts.get("policy", "all"),
            quorum=opts.get("quorum"),
            op_timeout=float(opts.get("op_timeout", DEFAULT_OP_TIMEOUT)),
        )
