"""Inode table: maps kernel inode numbers to backend paths and owns lookup counts.

Invariants (see docs/design.md):
- inode 1 is the root and is never dropped;
- a node is reachable by path until it is unlinked or renamed away;
- a node is dropped only when the kernel has forgotten every lookup *and* no
  handle is open on it, so a file unlinked while open keeps working.
"""

from __future__ import annotations

import stat as stat_mod
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from omnifs.backends.base import ObjectInfo, basename, parent_of

if TYPE_CHECKING:
    from omnifs.staging import StagedFile

ROOT_INODE = 1
_DEFAULT_PERMS = {"file": 0o644, "dir": 0o755, "symlink": 0o777}


@dataclass(slots=True)
class Attr:
    """The attributes the kernel sees for one node (``mode`` includes type bits)."""

    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    nlink: int = 1
    target: str | None = None
    etag: str | None = None

    @property
    def kind(self) -> str:
        if stat_mod.S_ISDIR(self.mode):
            return "dir"
        if stat_mod.S_ISLNK(self.mode):
            return "symlink"
        return "file"

    @classmethod
    def from_info(cls, info: ObjectInfo, uid: int, gid: int) -> Attr:
        """Build attributes from backend info, filling what the backend lacks."""
        perms = info.mode if info.mode is not None else _DEFAULT_PERMS[info.kind]
        mtime = info.mtime_ns or time.time_ns()
        return cls(
            mode=info.type_bits() | (perms & 0o7777),
            uid=info.uid if info.uid is not None else uid,
            gid=info.gid if info.gid is not None else gid,
            size=len(info.target.encode("utf-8", "surrogateescape")) if info.target is not None else info.size,
            atime_ns=info.atime_ns or mtime,
            mtime_ns=mtime,
            ctime_ns=info.ctime_ns or mtime,
            nlink=info.nlink if info.kind == "dir" and info.nlink else 1,
            target=info.target,
            etag=info.etag,
        )


@dataclass(eq=False, slots=True)
class Node:
    """One file, directory or symlink the kernel may refer to by inode number."""

    inode: int
    path: str
    attr: Attr
    refreshed: float = 0.0  # monotonic time attrs were last read from the backend
    lookups: int = 0
    open_count: int = 0
    staged: StagedFile | None = None
    unlinked: bool = False
    partial: bool = False  # attrs came from a listing that lacks mode/owner
    kernel_cache_key: tuple[object, ...] | None = None
    info: ObjectInfo | None = None  # what the backend last said (the version reads are served from)
    stage_lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def kind(self) -> str:
        return self.attr.kind

    @property
    def authoritative(self) -> bool:
        """True when local state is newer than the backend's (dirty staged data)."""
        return self.staged is not None and (self.staged.dirty or self.unlinked)


class InodeTable:
    """Not thread-safe: used only from the trio thread."""

    def __init__(self, root_attr: Attr) -> None:
        self._next = ROOT_INODE + 1
        root = Node(ROOT_INODE, "", root_attr, lookups=1)
        self._by_inode: dict[int, Node] = {ROOT_INODE: root}
        self._by_path: dict[str, Node] = {"": root}
        self._by_parent: dict[str, dict[str, Node]] = {}  # parent path -> name -> node (mirrors _by_path)

    @property
    def root(self) -> Node:
        return self._by_inode[ROOT_INODE]

    def __len__(self) -> int:
        return len(self._by_inode)

    def get(self, inode: int) -> Node | None:
        return self._by_inode.get(inode)

    def by_path(self, path: str) -> Node | None:
        return self._by_path.get(path)

    def nodes(self) -> list[Node]:
        return list(self._by_inode.values())

    def children(self, path: str) -> list[Node]:
        """The nodes currently named directly inside directory ``path`` (O(children))."""
        return list(self._by_parent.get(path, {}).values())

    def subtree(self, path: str) -> list[Node]:
        """The nodes named ``path`` or below it (a file or symlink: itself, without scanning the table)."""
        top = self._by_path.get(path)
        if top is not None and top.kind != "dir":
            return [top]
        prefix = path + "/"
        return [n for p, n in self._by_path.items() if p == path or p.startswith(prefix)]

    def _name(self, node: Node) -> None:
        self._by_path[node.path] = node
        self._by_parent.setdefault(parent_of(node.path), {})[basename(node.path)] = node

    def _unname(self, path: str) -> None:
        del self._by_path[path]
        parent = parent_of(path)
        siblings = self._by_parent.get(parent)
        if siblings is not None:
            siblings.pop(basename(path), None)
            if not siblings:
                del self._by_parent[parent]

    def ensure(self, info: ObjectInfo, attr: Attr, now: float) -> Node:
        """Return the node for ``info.path``, creating it or refreshing its attributes.

        A node whose type changed on the backend is replaced by a new inode.
        Local authoritative state (dirty staged data) is never overwritten.
        """
        node = self._by_path.get(info.path)
        if node is not None and node.kind != attr.kind and node.inode != ROOT_INODE:
            self.detach(node)
            node = None
        if node is None:
            node = Node(self._next, info.path, attr, refreshed=now, info=info)
            self._next += 1
            self._by_inode[node.inode] = node
            self._name(node)
        elif not node.authoritative:
            node.attr = attr
            node.refreshed = now
            node.info = info
        return node

    def forget(self, inode: int, count: int) -> None:
        node = self._by_inode.get(inode)
        if node is None or inode == ROOT_INODE:
            return
        node.lookups = max(0, node.lookups - count)
        self.maybe_drop(node)

    def maybe_drop(self, node: Node) -> None:
        """Drop ``node`` if nothing refers to it any more (never while it holds staged data)."""
        if node.inode == ROOT_INODE or node.lookups > 0 or node.open_count > 0 or node.staged is not None:
            return
        self._by_inode.pop(node.inode, None)
        if self._by_path.get(node.path) is node:
            self._unname(node.path)

    def detach(self, node: Node) -> None:
        """Remove ``node`` from the namespace (unlinked); it lives on while referenced."""
        if self._by_path.get(node.path) is node:
            self._unname(node.path)
        node.unlinked = True
        self.maybe_drop(node)

    def move(self, old: str, new: str) -> None:
        """Re-key the node at ``old`` and every descendant to live under ``new``."""
        victim = self._by_path.get(new)
        if victim is not None:
            self.detach(victim)
        moved = self.subtree(old)
        for node in moved:
            self._unname(node.path)
        for node in moved:
            node.path = new + node.path[len(old) :]
            self._name(node)
