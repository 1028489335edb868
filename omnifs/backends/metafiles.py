"""A wrapper backend presenting each file's metadata as a companion ``.meta.json`` file.

``MetaBackend(inner)`` is an ordinary backend to the layers above (Remote,
VFS): a listing gains a companion per regular file, and ``stat``/``read`` of a
companion render its JSON from the file's live attributes plus the stored
writable fields (naming and schema: ``omnifs/meta.py``).  Where the writable
fields are stored depends on the inner backend:

- *native* (``capabilities.native_metadata``, S3): in the object's own user
  metadata, changed in place by ``inner.set_metadata`` (copy with REPLACE);
- *sidecar* (local, SFTP, memory): in a real companion file beside the main
  file, holding the full document as of its last write (the usual desktop
  layout).  Existing companion files are recognised, system fields are always
  rendered live, and a sidecar moves to a new name whenever the collision rule
  renames a companion.

Metadata follows its file: ``rename`` and ``delete`` of a file carry or drop
it; a rename over an existing file by a source without metadata keeps the
target's (an editor's temp + rename save); a file re-created shortly after it
was renamed away gets the metadata back (an editor's rename-to-backup save).
A rename *onto* a companion imports the source's JSON; a rename of a companion
*away* writes its rendered content to the target and leaves the metadata in
place (a companion cannot be separated from its file).  ``delete`` of a
companion resets the writable fields.

Validation of written companions happens twice: strictly in
:meth:`MetaBackend.validate_staged`, which the VFS calls at flush/close so the
writer sees EINVAL, and leniently (syntax only) when the write-back upload
arrives in :meth:`write`.  Every method raises only ``omnifs.errors`` domain
errors.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, BinaryIO, Protocol

import trio

from omnifs import meta
from omnifs.backends.base import Backend, ObjectInfo, SetAttrs, StatFs, basename, join, parent_of
from omnifs.errors import (
    BackendUnavailable,
    InvalidArgument,
    NoSuchAttribute,
    NotADirectory,
    NotFound,
    NotSupported,
    OmniError,
)
from omnifs.meta import MetaError, SystemFields, UserMeta
from omnifs.metaindex import MetaIndex

log = logging.getLogger(__name__)

DIR_TTL = 2.0  # seconds a folder listing is reused for rendering companions (dropped on any change)
MOVED_GRACE = 120.0  # seconds a renamed-away file's metadata may be claimed back by a re-created file
_PARALLEL = 16  # concurrent stats/reads while rendering the companions of one listing

LocalView = Callable[[str], "tuple[int, int] | None"]  # path -> (size, mtime_ns) of data not yet uploaded


class CachedView(Protocol):
    """What the mount has cached, for checks while the backend is away."""

    async def listing(self, path: str) -> list[ObjectInfo] | None:
        """The cached listing of directory ``path`` (None: not cached)."""

    async def stat(self, path: str) -> ObjectInfo | None:
        """The cached info of ``path`` (None: not cached or absent)."""


class _Dir:
    """One directory as seen for companion purposes: immutable once built, O(1) lookups.

    Companion names can only clash between names with the same root (the part
    before the first dot), so naming is computed per root group; ``with_file``
    adds one file by recomputing only its group.
    """

    __slots__ = ("_groups", "_owners", "_slot_by_main", "_stored_by_main", "files", "path", "slots")

    def __init__(self, path: str, files: dict[str, ObjectInfo]) -> None:
        self.path = path
        self.files = files  # regular files by name (mains and companion-named files)
        self._groups: dict[str, frozenset[str]] = {}
        grouped: dict[str, set[str]] = {}
        for name in files:
            grouped.setdefault(_root(name), set()).add(name)
        self.slots: dict[str, str] = {}  # companion name -> main name
        self._owners: dict[str, str] = {}  # sidecar file name -> main name
        for root, names in grouped.items():
            self._groups[root] = frozenset(names)
            slots, owners = _group_naming(names, files)
            self.slots.update(slots)
            self._owners.update(owners)
        self._slot_by_main = {m: c for c, m in self.slots.items()}
        self._stored_by_main = {m: c for c, m in self._owners.items()}

    def slot_of(self, main: str) -> str | None:
        """The companion name of ``main`` in this directory (None: it gets none)."""
        return self._slot_by_main.get(main)

    def stored_of(self, main: str) -> str | None:
        """The sidecar file holding ``main``'s metadata, if any."""
        return self._stored_by_main.get(main)

    def owners(self) -> dict[str, str]:
        """Sidecar file name -> main name, for companion files present in this directory (a fresh copy).

        A main owns the file at its current slot; failing that, the file at its
        other possible name when no other main could claim that name.
        """
        return dict(self._owners)

    def with_file(self, info: ObjectInfo) -> _Dir:
        """This directory with ``info`` added or replaced; O(entries) copying, naming redone for one group."""
        out = _Dir.__new__(_Dir)
        out.path = self.path
        out.files = dict(self.files)
        out.files[info.name] = info
        root = _root(info.name)
        old = self._groups.get(root, frozenset())
        names = old | {info.name}
        out._groups = dict(self._groups)
        out._groups[root] = names
        out.slots = dict(self.slots)
        out._owners = dict(self._owners)
        out._slot_by_main = dict(self._slot_by_main)
        out._stored_by_main = dict(self._stored_by_main)
        for name in old:
            slot = out._slot_by_main.pop(name, None)
            if slot is not None:
                del out.slots[slot]
            stored = out._stored_by_main.pop(name, None)
            if stored is not None:
                del out._owners[stored]
        slots, owners = _group_naming(names, out.files)
        out.slots.update(slots)
        out._owners.update(owners)
        out._slot_by_main.update({m: c for c, m in slots.items()})
        out._stored_by_main.update({m: c for c, m in owners.items()})
        return out

    def moves_after_adding(self, after: _Dir, name: str) -> list[tuple[str, str]]:
        """(sidecar, new name) pairs for sidecars whose companion name changes when ``name`` joins (``after``)."""
        moves = []
        for main in self._groups.get(_root(name), ()):
            stored = self._stored_by_main.get(main)
            if stored is None or main not in after.files or stored not in after.files:
                continue
            slot = after.slot_of(main)
            if slot is not None and slot != stored:
                moves.append((stored, slot))
        return moves


def _root(name: str) -> str:
    """The part of a name before its first dot: names with different roots never share a companion name."""
    return name.partition(".")[0]


def _group_naming(names: Iterable[str], files: Mapping[str, ObjectInfo]) -> tuple[dict[str, str], dict[str, str]]:
    """(companion name -> main, sidecar file -> main) for one root group of a directory's file names."""
    names = sorted(names)
    slots = meta.companion_map(names)
    owners = {c: m for c, m in slots.items() if c in files}
    claims: dict[str, list[str]] = {}
    for main in names:
        if meta.has_companion(main):
            for alt in meta.alternate_names(main):
                if alt in files:
                    claims.setdefault(alt, []).append(main)
    owned = set(owners.values())
    for alt, mains in claims.items():
        if alt not in owners and len(mains) == 1 and alt not in slots and mains[0] not in owned:
            owners[alt] = mains[0]
            owned.add(mains[0])
    return slots, owners


class MetaBackend(Backend):
    """Companion files over ``inner``; ``show=False`` leaves them out of listings (still open by name)."""

    type_name = "meta"

    def __init__(self, inner: Backend, *, show: bool = True, index: MetaIndex | None = None) -> None:
        super().__init__(inner.name)
        self.inner = inner
        self.type_name = inner.type_name  # type: ignore[misc]  # status shows the real backend type
        self.show = show
        self.index = index
        self.native = inner.capabilities.native_metadata
        # xattrs: user.omnifs.<field> always work; other names only where the inner backend has xattrs.
        self.capabilities = replace(inner.capabilities, xattrs=True)
        # Renamed-away files: src -> (dst, when, dst's metadata kept when dst was deleted).
        self._moved: dict[str, tuple[str, float, UserMeta | None]] = {}
        self._dirs: dict[str, tuple[float, _Dir]] = {}  # short-lived folder listings (_dir)
        self._generation = 0

    def describe(self) -> str:
        return self.inner.describe()

    # --- hooks used by the layers above ------------------------------------------------------------
    def is_companion(self, path: str) -> bool:
        """True when ``path`` has the companion form (cheap; no I/O).  Used to open with direct_io."""
        return meta.is_companion_name(basename(path)) and meta.dir_has_companions(parent_of(path))

    @property
    def lists_derived(self) -> bool:
        """True when listings include companions (``meta_files=show``)."""
        return self.show

    def derived_paths(self, path: str) -> list[str]:
        """Cache entries that change when ``path`` changes: its possible companions (no I/O)."""
        name = basename(path)
        if not path or not meta.has_companion(name) or not meta.dir_has_companions(parent_of(path)):
            return []
        return [join(parent_of(path), c) for c in meta.alternate_names(name)]

    async def validate_staged(
        self, path: str, data: bytes, local: LocalView, cached: CachedView | None = None
    ) -> None:
        """Check a companion about to be accepted at close; InvalidArgument (or E2BIG) says why.

        ``data`` is the written document; ``local`` gives the size and mtime
        of a main file whose new data is not uploaded yet.  With ``cached``
        (the backend is away) the check uses only what the mount has cached and
        does no backend I/O: the document and its read-only fields are checked,
        S3's size limit and a foreign file in the sidecar's place only when the
        upload arrives (``write``; refused then, and logged).  Paths that are
        not companions return at once without I/O.
        """
        if not self.is_companion(path):
            return
        if cached is None:
            d = await self._dir(parent_of(path))
        else:
            listing = await cached.listing(parent_of(path))
            if listing is None:
                raise BackendUnavailable(f"{parent_of(path) or '/'}: offline and not cached; cannot check {path}")
            d = _make_dir(parent_of(path), listing)
        main_name = d.slots.get(basename(path))
        if main_name is None:
            return  # an ordinary file that happens to end in .meta.json
        if len(data) > meta.MAX_DOCUMENT:
            raise OmniError(f"{path}: companion larger than {meta.MAX_DOCUMENT} bytes", errno=errno.E2BIG)
        if not data.strip():
            return  # truncated (O_TRUNC before the new content): an empty companion changes nothing
        if cached is None:
            main = await self._main_info(d.files[main_name])
        else:
            main = await cached.stat(d.files[main_name].path) or d.files[main_name]
        pending = local(main.path)
        if pending is not None:
            main = replace(main, size=pending[0], mtime_ns=pending[1])
        try:
            user = meta.parse(data, _system(main), default_content_type=self._default_ct(main))
        except MetaError as exc:
            log.warning("refused %s: %s (the previous metadata stays)", path, exc)
            raise InvalidArgument(f"{path}: {exc}") from None
        if cached is not None:
            return
        if self.native:
            await self.inner.set_metadata(main.path, self._content_type(main, user), meta.to_s3(user), check_only=True)
        else:
            for name in {_stored_name(d, main_name), basename(path)} - {None}:
                if name in d.files and not await self._is_companion_file(d.files[str(name)]):
                    raise InvalidArgument(f"{join(d.path, str(name))} exists and is not a companion document")

    # --- reading ------------------------------------------------------------------------------------
    async def stat(self, path: str) -> ObjectInfo:
        rendered = await self._companion(path)
        if rendered is None:
            return await self.inner.stat(path)
        return rendered[0]

    async def list(self, path: str) -> list[ObjectInfo]:
        infos = await self.inner.list(path)
        if not meta.dir_has_companions(path):
            return infos
        d = _make_dir(path, infos)
        if not d.slots:
            return infos
        out = [i for i in infos if i.name not in d.slots]  # files in companion slots are presented as companions
        if not self.show:
            return out
        owners = d.owners()
        stored_of = {m: c for c, m in owners.items()}
        limiter = trio.CapacityLimiter(_PARALLEL)
        rendered: list[ObjectInfo] = []
        seen: list[Any] = []

        async def one(comp: str, main_name: str) -> None:
            async with limiter:
                try:
                    info, _data = await self._render(d, comp, d.files[main_name], stored_of.get(main_name), seen=seen)
                except NotFound:
                    return  # deleted meanwhile
                rendered.append(info)

        async with trio.open_nursery() as nursery:
            for comp, main_name in d.slots.items():
                nursery.start_soon(one, comp, main_name)
        await self._index(lambda ix: ix.put_many(seen))
        return sorted(out + rendered, key=lambda i: i.name)

    async def read(self, path: str, offset: int, size: int) -> bytes:
        rendered = await self._companion(path)
        if rendered is None:
            return await self.inner.read(path, offset, size)
        return rendered[1][offset : offset + size]

    async def read_versioned(self, path: str, offset: int, size: int) -> tuple[bytes, str]:
        rendered = await self._companion(path)
        if rendered is None:
            return await self.inner.read_versioned(path, offset, size)
        info, data = rendered
        assert info.etag is not None
        return data[offset : offset + size], info.etag

    # --- writing ------------------------------------------------------------------------------------
    async def write(self, path: str, src: BinaryIO, attrs: SetAttrs | None = None) -> ObjectInfo:
        name = basename(path)
        if meta.has_companion(name) and meta.dir_has_companions(parent_of(path)):
            return await self._write_main(path, src, attrs)
        async with self._changing():
            return await self._write_now(path, src, attrs)

    async def _write_main(self, path: str, src: BinaryIO, attrs: SetAttrs | None) -> ObjectInfo:
        """Upload a file that has a companion; the folder's reused view is updated, not dropped.

        A bulk copy into one folder thus lists it about once per ``DIR_TTL``
        rather than twice per file.  A new name that changes which companion
        names clash moves the affected sidecar files (the collision rule).
        """
        parent, name = parent_of(path), basename(path)
        before = await self._dir(parent) if self._sidecar_mode else None
        self._generation += 1  # a listing of this folder running meanwhile is not reused
        try:
            info = await self.inner.write(path, src, attrs)
        except BaseException:
            self._dirs.pop(parent, None)
            raise
        finally:
            self._generation += 1
        reusable = self._reusable(parent)
        if reusable is None:
            if before is not None and name not in before.files:
                await self._normalise(parent, before.owners())
        else:
            stamp, d = reusable
            after = d.with_file(replace(info, content_type=None) if self.native else info)  # native: re-read metadata
            self._dirs[parent] = (stamp, after)
            if self._sidecar_mode and name not in d.files:
                for stored, slot in d.moves_after_adding(after, name):
                    log.debug("companion of %s/%s: %s -> %s", parent, after.owners().get(stored), stored, slot)
                    await self._mut(self.inner.rename, join(parent, stored), join(parent, slot))
        await self._after_main_write(path)
        return info

    async def _write_now(self, path: str, src: BinaryIO, attrs: SetAttrs | None = None) -> ObjectInfo:
        if self.is_companion(path):
            d = await self._dir(parent_of(path))
            main_name = d.slots.get(basename(path))
            if main_name is not None:
                data = await self.run_sync(_read_stream, src, meta.MAX_DOCUMENT + 1)
                return await self._write_companion(d, path, main_name, data)
        # Files that have companions go through _write_main; what is left gets none here.
        info = await self._mut(self.inner.write, path, src, attrs)
        await self._after_main_write(path)
        return info

    async def _write_companion(self, d: _Dir, path: str, main_name: str, data: bytes) -> ObjectInfo:
        """Store an uploaded companion (checked strictly at close); invalid content is dropped and logged.

        An empty write is how the VFS creates a file: the companion already exists, nothing changes.
        """
        if data.strip():
            main = await self._main_info(d.files[main_name])
            try:
                user = meta.parse(data, None, default_content_type=self._default_ct(main))
            except MetaError as exc:
                log.error("not storing %s: %s (the previous metadata stays)", path, exc)
            else:
                try:
                    await self._store(d, main, user, _stored_name(d, main_name))
                except InvalidArgument as exc:
                    log.error("not storing %s: %s", path, exc)
        rendered = await self._companion(path)
        if rendered is None:
            raise NotFound(path)
        return rendered[0]

    async def delete(self, path: str) -> None:
        async with self._changing():
            await self._delete_now(path)

    async def _delete_now(self, path: str) -> None:
        if self.is_companion(path):
            d = await self._dir(parent_of(path))
            main_name = d.slots.get(basename(path))
            if main_name is not None:  # deleting a companion resets the metadata
                main = await self._main_info(d.files[main_name])
                await self._store(d, main, UserMeta(), None)
                return
        await self._keep_moved_meta(path)
        if not self._sidecars_here(path):
            await self._mut(self.inner.delete, path)
            await self._index(lambda ix: ix.forget(path))
            return
        before = await self._dir(parent_of(path))
        await self._mut(self.inner.delete, path)
        owners = before.owners()
        for c, m in list(owners.items()):
            if m == basename(path):
                await self._quiet(self._mut(self.inner.delete, join(before.path, c)))
                del owners[c]
        await self._normalise(before.path, owners)
        await self._index(lambda ix: ix.forget(path))

    async def rename(self, src: str, dst: str) -> None:
        async with self._changing():
            await self._rename_now(src, dst)

    async def _rename_now(self, src: str, dst: str) -> None:
        if self.is_companion(dst):
            d = await self._dir(parent_of(dst))
            main_name = d.slots.get(basename(dst))
            if main_name is not None:
                await self._import_by_rename(src, d, main_name)
                return
        if self.is_companion(src):
            rendered = await self._companion(src)
            if rendered is not None:  # copy the companion out; the metadata stays with its file
                await self._mut(self.inner.write, dst, io.BytesIO(rendered[1]))
                return
        if self.native:
            await self._rename_native(src, dst)
        elif self._sidecars_here(src) or self._sidecars_here(dst):
            await self._rename_sidecar(src, dst)
        else:
            await self._mut(self.inner.rename, src, dst)
        await self._index(lambda ix: ix.move(src, dst))

    async def _rename_native(self, src: str, dst: str) -> None:
        src_info = await self.inner.stat(src)
        dst_user = UserMeta()
        dst_existed = False
        if src_info.kind == "file":
            try:
                dst_info = await self.inner.stat(dst)
                dst_existed = dst_info.kind == "file"
                if dst_existed:
                    dst_user = self._user_native(dst_info)
            except NotFound:
                pass
        await self._mut(self.inner.rename, src, dst)
        if src_info.kind != "file":
            return
        src_user = self._user_native(src_info)
        if src_user.is_empty() and not dst_user.is_empty():  # temp + rename over X keeps X's metadata
            main = await self.inner.stat(dst)
            await self._mut(self.inner.set_metadata, dst, self._content_type(main, dst_user), meta.to_s3(dst_user))
        elif not dst_existed and not src_user.is_empty():
            self._moved[src] = (dst, time.monotonic(), None)

    async def _rename_sidecar(self, src: str, dst: str) -> None:
        sdir, ddir = parent_of(src), parent_of(dst)
        before_src = await self._dir(sdir)
        before_dst = before_src if ddir == sdir else await self._dir(ddir)
        src_name, dst_name = basename(src), basename(dst)
        is_file = src_name in before_src.files
        src_owners, dst_owners = before_src.owners(), before_dst.owners()
        carried = next((c for c, m in src_owners.items() if m == src_name), None) if is_file else None
        dst_existed = dst_name in before_dst.files
        await self._mut(self.inner.rename, src, dst)
        if not is_file:
            return
        if carried is not None:
            src_owners.pop(carried, None)
            # The moved file's companion becomes the target's (replacing any the target had).
            for c, m in list(dst_owners.items()):
                if m == dst_name and not (ddir == sdir and c == carried):
                    await self._quiet(self._mut(self.inner.delete, join(ddir, c)))
                    dst_owners.pop(c, None)
            after = await self._dir(ddir)
            slot = after.slot_of(dst_name)
            tmp_owner = join(sdir, carried)
            if slot is None:
                await self._quiet(self._mut(self.inner.delete, tmp_owner))
            elif join(ddir, slot) != tmp_owner:
                await self._mut(self.inner.rename, tmp_owner, join(ddir, slot))
            if sdir == ddir:
                src_owners.pop(slot or "", None)
            dst_owners = {c: m for c, m in dst_owners.items() if c != slot}
            if not dst_existed:
                self._moved[src] = (dst, time.monotonic(), None)
        await self._normalise(sdir, src_owners)
        if ddir != sdir:
            await self._normalise(ddir, dst_owners)

    async def _import_by_rename(self, src: str, d: _Dir, main_name: str) -> None:
        """rename(temp, companion): an editor's atomic save; the temp file's JSON becomes the metadata."""
        src_info = await self.inner.stat(src)
        if src_info.kind != "file":
            raise InvalidArgument(f"only a file can replace the companion {join(d.path, main_name)}")
        data = await self._read_all(src, src_info.size, limit=meta.MAX_DOCUMENT + 1)
        main = await self._main_info(d.files[main_name])
        try:
            user = meta.parse(data, _system(main), default_content_type=self._default_ct(main))
        except MetaError as exc:
            log.warning("refused rename of %s over the companion of %s: %s", src, main.path, exc)
            raise InvalidArgument(f"{exc}") from None
        stored = _stored_name(d, main_name)
        await self._store(d, main, user, stored)
        await self._mut(self.inner.delete, src)

    # --- pass-through ---------------------------------------------------------------------------------
    async def mkdir(self, path: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        async with self._changing():
            return await self._mkdir_now(path, attrs)

    async def _mkdir_now(self, path: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        return await self._mut(self.inner.mkdir, path, attrs)

    async def rmdir(self, path: str) -> None:
        async with self._changing():
            await self._rmdir_now(path)

    async def _rmdir_now(self, path: str) -> None:
        await self._mut(self.inner.rmdir, path)
        await self._index(lambda ix: ix.forget(path))

    async def symlink(self, path: str, target: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        async with self._changing():
            return await self._symlink_now(path, target, attrs)

    async def _symlink_now(self, path: str, target: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        return await self._mut(self.inner.symlink, path, target, attrs)

    async def set_attrs(self, path: str, attrs: SetAttrs) -> ObjectInfo:
        async with self._changing():
            return await self._set_attrs_now(path, attrs)

    async def _set_attrs_now(self, path: str, attrs: SetAttrs) -> ObjectInfo:
        rendered = await self._companion(path)
        if rendered is not None:
            return rendered[0]  # a companion's attributes follow its file (cp -a sets them: accepted, ignored)
        return await self._mut(self.inner.set_attrs, path, attrs)

    async def statfs(self) -> StatFs | None:
        return await self.inner.statfs()

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            if self.index is not None:
                self.index.close()

    # --- xattrs: user.omnifs.<field> ---------------------------------------------------------------------
    async def get_xattrs(self, path: str) -> dict[str, bytes]:
        """The inner backend's xattrs plus the writable metadata fields that hold a value.

        Read-only fields (``user.omnifs.size`` ...) are readable by name but not
        listed, so ``cp -a`` between mounts copies metadata without touching them.
        """
        out = await self._inner_xattrs(path)
        doc = await self._document_of(path)
        if doc is not None:
            listed = {k: doc[k] for k in meta.WRITABLE if k != "content_type" and doc[k]}
            if "content_type" in doc and doc.get("content_type_set"):
                listed["content_type"] = doc["content_type"]
            out.update(meta.to_xattrs(listed))
        return out

    async def get_xattr(self, path: str, name: str) -> bytes:
        """One xattr; every ``user.omnifs.<field>`` of a file with a companion (unset ones: ENODATA)."""
        if name.startswith(meta.XATTR_PREFIX) and name[len(meta.XATTR_PREFIX) :] in meta.XATTR_FIELDS:
            doc = await self._document_of(path)
            if doc is not None:
                value = meta.to_xattrs(doc).get(name)
                if value is None:
                    raise NoSuchAttribute(name)
                return value
        values = await self._inner_xattrs(path)
        try:
            return values[name]
        except KeyError:
            raise NoSuchAttribute(name) from None

    async def _inner_xattrs(self, path: str) -> dict[str, bytes]:
        if not self.inner.capabilities.xattrs:
            return {}
        return dict(await self.inner.get_xattrs(path))

    async def _document_of(self, path: str) -> dict[str, Any] | None:
        """The metadata document of the regular file ``path`` (None when it has no companion)."""
        if self.is_companion(path) or not meta.has_companion(basename(path)):
            return None
        if not meta.dir_has_companions(parent_of(path)):
            return None
        d = await self._dir(parent_of(path))
        main = d.files.get(basename(path))
        slot = d.slot_of(basename(path))
        if main is None or slot is None:
            return None
        main = await self._main_info(main)
        user = await self._user_meta(d, main)
        doc = meta.document(_system(main), user, self._default_ct(main))
        doc["content_type_set"] = user.content_type is not None
        return doc

    async def set_xattr(self, path: str, name: str, value: bytes | None) -> None:
        async with self._changing():
            await self._set_xattr_now(path, name, value)

    async def _set_xattr_now(self, path: str, name: str, value: bytes | None) -> None:
        if not name.startswith(meta.XATTR_PREFIX):
            if not self.inner.capabilities.xattrs:
                raise NotSupported(f"{self.inner.type_name} has no extended attributes")
            await self._mut(self.inner.set_xattr, path, name, value)
            return
        key = name[len(meta.XATTR_PREFIX) :]
        if key not in meta.XATTR_FIELDS or not meta.has_companion(basename(path)):
            if not self.inner.capabilities.xattrs:
                raise NotSupported(f"{name} is not a metadata field")
            await self._mut(self.inner.set_xattr, path, name, value)
            return
        d = await self._dir(parent_of(path))
        if basename(path) not in d.files or d.slot_of(basename(path)) is None:
            raise NotSupported(f"{path} has no metadata")
        main = await self._main_info(d.files[basename(path)])
        user = await self._user_meta(d, main)
        if key in meta.READ_ONLY:
            current = meta.document(_system(main), user, self._default_ct(main)).get(key)
            given = None if value is None else value.decode("utf-8", "replace")
            if key in meta.IDENTITY and given != str(current):
                raise InvalidArgument(f"{name} is read-only")
            return  # created/etag: accepted and ignored (see omnifs.meta.parse)
        try:
            new = user.with_field(key, None if value is None else meta.field_from_xattr(key, value))
        except MetaError as exc:
            raise InvalidArgument(str(exc)) from None
        if value is None and new == user:
            raise NoSuchAttribute(name)
        stored = _stored_name(d, main.name)
        await self._store(d, main, new, stored)

    # --- internals ---------------------------------------------------------------------------------------
    @property
    def _sidecar_mode(self) -> bool:
        return not self.native

    def _sidecars_here(self, path: str) -> bool:
        """True when a change at ``path`` may move sidecar files (sidecar mode, eligible name)."""
        return self._sidecar_mode and meta.dir_has_companions(parent_of(path)) and meta.has_companion(basename(path))

    async def _dir(self, path: str) -> _Dir:
        """The folder as the inner backend lists it; reused for DIR_TTL seconds while nothing changes.

        Rendering each companion of a folder needs that folder's listing; without
        this, ``ls -l`` of N files listed the folder N times.  Any change made
        through this wrapper drops every reused listing (see ``_changing``).
        """
        reusable = self._reusable(path)
        if reusable is not None:
            return reusable[1]
        generation = self._generation
        try:
            infos = await self.inner.list(path)
        except (NotFound, NotADirectory):
            infos = []
        d = _make_dir(path, infos)
        if generation == self._generation:  # no change began or ended meanwhile
            self._dirs[path] = (time.monotonic(), d)
        return d

    def _reusable(self, path: str) -> tuple[float, _Dir] | None:
        """(listed at, view) of ``path`` while it may be reused."""
        cached = self._dirs.get(path)
        if cached is not None and time.monotonic() - cached[0] < DIR_TTL:
            return cached
        return None

    async def _mut(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """A change of the inner backend (reads repair too): reused folder listings are dropped after it."""
        try:
            return await fn(*args)
        finally:
            self._generation += 1
            self._dirs.clear()

    @contextlib.asynccontextmanager
    async def _changing(self) -> AsyncIterator[None]:
        """Around every change: reused folder listings are dropped before and after it."""
        self._generation += 1
        self._dirs.clear()
        try:
            yield
        finally:
            self._generation += 1
            self._dirs.clear()

    async def _companion(self, path: str) -> tuple[ObjectInfo, bytes] | None:
        """(info, bytes) when ``path`` is the companion of an existing file, else None."""
        if not self.is_companion(path):
            return None
        d = await self._dir(parent_of(path))
        main_name = d.slots.get(basename(path))
        if main_name is None:
            return None
        stored = _stored_name(d, main_name)
        return await self._render(d, basename(path), d.files[main_name], stored)

    async def _main_info(self, info: ObjectInfo, *, fresh: bool = False) -> ObjectInfo:
        """Full info of a main file: listings of native backends lack user metadata.

        (The S3 backend itself remembers what HEAD told it per object version,
        and lists such objects with full info.)
        """
        if fresh or (self.native and info.content_type is None):
            return await self.inner.stat(info.path)
        return info

    def _default_ct(self, main: ObjectInfo) -> str:
        if self.native and main.content_type:
            return main.content_type
        return meta.guess_content_type(main.name)

    def _content_type(self, main: ObjectInfo, user: UserMeta) -> str:
        return user.content_type or meta.guess_content_type(main.name)

    def _user_native(self, main: ObjectInfo) -> UserMeta:
        return meta.from_s3(main.metadata, main.content_type, main.name)

    async def _user_meta(self, d: _Dir, main: ObjectInfo) -> UserMeta:
        if self.native:
            return self._user_native(await self._main_info(main))
        stored = _stored_name(d, main.name)
        if stored is None:
            return UserMeta()
        info = d.files[stored]
        return meta.parse_stored(await self._read_all(info.path, info.size, limit=meta.MAX_DOCUMENT + 1))

    async def _render(
        self, d: _Dir, comp: str, main: ObjectInfo, stored: str | None, *, seen: list[Any] | None = None
    ) -> tuple[ObjectInfo, bytes]:
        """Render the companion ``comp`` of ``main``; ``stored`` names its sidecar file, if any."""
        main = await self._main_info(main)
        if self.native:
            user = self._user_native(main)
            if comp in d.files:  # a real object in the companion slot (copied in before its file): import it
                user = await self._adopt_orphan(d, comp, main, user)
            mtime = main.mtime_ns
        elif stored is not None:
            sidecar = d.files[stored]
            user = meta.parse_stored(await self._read_all(sidecar.path, sidecar.size, limit=meta.MAX_DOCUMENT + 1))
            mtime = max(main.mtime_ns, sidecar.mtime_ns)
        else:
            user = UserMeta()
            mtime = main.mtime_ns
        doc = meta.document(_system(main), user, self._default_ct(main))
        data = meta.render(_system(main), user, self._default_ct(main))
        digest = hashlib.sha256(data).hexdigest()[:24]
        info = ObjectInfo(
            path=join(d.path, comp),
            kind="file",
            size=len(data),
            mtime_ns=mtime,
            ctime_ns=main.ctime_ns,
            etag=f"meta-{digest}",
        )
        if seen is not None:
            seen.append((main.path, doc))  # indexed in one batch by the caller
        else:
            await self._index(lambda ix: ix.put(main.path, doc))
        return info, data

    async def _is_companion_file(self, info: ObjectInfo) -> bool:
        """True when a real file in a companion's place holds a companion document (never lose other data)."""
        if info.size > meta.MAX_DOCUMENT:
            return False
        return meta.looks_like_companion(await self._read_all(info.path, info.size, limit=meta.MAX_DOCUMENT + 1))

    async def _adopt_orphan(self, d: _Dir, comp: str, main: ObjectInfo, user: UserMeta) -> UserMeta:
        """Import a real object found in a companion slot (native mode) and delete it.

        Only companion-shaped JSON is imported and deleted; anything else stays (hidden by the companion).
        """
        obj = d.files[comp]
        try:
            data = await self._read_all(obj.path, obj.size, limit=meta.MAX_DOCUMENT + 1)
            if not meta.looks_like_companion(data):
                log.warning("%s is not a companion document; left in place (hidden by the companion)", obj.path)
                return user
            found = meta.parse_stored(data)
            if user.is_empty() and not found.is_empty():
                await self._mut(self.inner.set_metadata, main.path, self._content_type(main, found), meta.to_s3(found))
                user = found
                log.info("imported %s as the metadata of %s", obj.path, main.path)
            await self._mut(self.inner.delete, obj.path)
        except OmniError as exc:
            log.warning("could not import %s as metadata of %s: %s", obj.path, main.path, exc)
        return user

    async def _store(self, d: _Dir, main: ObjectInfo, user: UserMeta, stored: str | None) -> None:
        """Store the writable fields of ``main`` (native metadata or its sidecar file)."""
        if self.native:
            await self._mut(self.inner.set_metadata, main.path, self._content_type(main, user), meta.to_s3(user))
            for c in meta.alternate_names(main.name):  # a real object shadowed by the companion: now imported
                if c in d.files and d.slots.get(c) == main.name and await self._is_companion_file(d.files[c]):
                    await self._quiet(self._mut(self.inner.delete, join(d.path, c)))
        else:
            slot = d.slot_of(main.name)
            if slot is None:
                raise NotSupported(f"{main.path} cannot have a companion here")
            target = join(d.path, slot)
            for name in {stored, slot} - {None}:
                if name in d.files and not await self._is_companion_file(d.files[str(name)]):
                    raise InvalidArgument(f"{join(d.path, str(name))} exists and is not a companion document")
            if user.is_empty():
                for name in {stored, slot} - {None}:
                    if name in d.files:
                        await self._quiet(self._mut(self.inner.delete, join(d.path, str(name))))
            else:
                data = meta.render(_system(main), user, self._default_ct(main))
                await self._mut(self.inner.write, target, io.BytesIO(data))
                if stored is not None and stored != slot:
                    await self._quiet(self._mut(self.inner.delete, join(d.path, stored)))
        doc = meta.document(_system(main), user, self._default_ct(main))
        await self._index(lambda ix: ix.put(main.path, doc))

    async def _normalise(self, dir_path: str, owners: Mapping[str, str]) -> None:
        """Move sidecar files whose companion name changed (the collision rule) to their new names.

        ``owners`` maps sidecar file name -> main name as it was before a change.
        """
        if not owners:
            return
        d = await self._dir(dir_path)
        moves = []
        for stored, main in owners.items():
            if main not in d.files or stored not in d.files:
                continue
            slot = d.slot_of(main)
            if slot is not None and slot != stored:
                moves.append((stored, slot))
        for stored, slot in moves:
            log.debug("companion of %s/%s: %s -> %s", dir_path, owners[stored], stored, slot)
            await self._mut(self.inner.rename, join(dir_path, stored), join(dir_path, slot))

    async def _keep_moved_meta(self, path: str) -> None:
        """``path`` is about to be deleted: if a recent rename put it there, keep its metadata for the original.

        With write-back the original's new content may reach the backend only
        after the backup (``X~``) is deleted, so the metadata is kept here.
        """
        for src, (dst, when, kept) in list(self._moved.items()):
            if dst != path or kept is not None:
                continue
            try:
                d = await self._dir(parent_of(path))
                self._moved[src] = (dst, when, await self._user_meta(d, await self._main_info(d.files[basename(path)])))
            except (OmniError, KeyError):
                pass

    async def _after_main_write(self, path: str) -> None:
        """A file re-created right after it was renamed away (an editor's backup save) gets its metadata back."""
        moved = self._moved.pop(path, None)
        now = time.monotonic()
        self._moved = {k: v for k, v in self._moved.items() if now - v[1] < MOVED_GRACE}
        if moved is None or now - moved[1] >= MOVED_GRACE or not meta.has_companion(basename(path)):
            return
        try:
            d_new = await self._dir(parent_of(moved[0]))
            if basename(moved[0]) in d_new.files:
                theirs = await self._user_meta(d_new, await self._main_info(d_new.files[basename(moved[0])]))
            elif moved[2] is not None:
                theirs = moved[2]  # the backup was deleted before this upload
            else:
                return
            d = d_new if parent_of(path) == d_new.path else await self._dir(parent_of(path))
            main = await self._main_info(d.files[basename(path)])
            if theirs.is_empty() or not (await self._user_meta(d, main)).is_empty():
                return
            stored = _stored_name(d, main.name)
            await self._store(d, main, theirs, stored)
            log.debug("%s re-created after a rename to %s: metadata carried back", path, moved[0])
        except (OmniError, KeyError) as exc:
            log.warning("could not carry metadata back to %s: %s", path, exc)

    async def _read_all(self, path: str, size: int, *, limit: int) -> bytes:
        if size > limit:
            raise OmniError(f"{path}: companion of {size} bytes is too large", errno=errno.E2BIG)
        out = b""
        while True:
            chunk = await self.inner.read(path, len(out), max(size - len(out), 1 << 16))
            if not chunk:
                return out
            out += chunk
            if len(out) > limit:
                raise OmniError(f"{path}: companion is too large", errno=errno.E2BIG)

    async def _index(self, fn: Callable[[MetaIndex], None]) -> None:
        if self.index is None:
            return
        index = self.index
        try:
            await trio.to_thread.run_sync(fn, index)
        except Exception as exc:  # the index is a convenience: never fail a filesystem call for it
            log.warning("metadata index update failed: %s", exc)

    @staticmethod
    async def _quiet(op: Awaitable[Any]) -> None:
        try:
            await op
        except NotFound:
            pass


def _make_dir(path: str, infos: Iterable[ObjectInfo]) -> _Dir:
    return _Dir(path, {i.name: i for i in infos if i.kind == "file"})


def _stored_name(d: _Dir, main_name: str) -> str | None:
    """The sidecar file holding ``main_name``'s metadata, if any."""
    return d.stored_of(main_name)


def _system(main: ObjectInfo) -> SystemFields:
    return SystemFields(main.name, main.size, main.mtime_ns, main.ctime_ns, main.etag)


def _read_stream(src: BinaryIO, limit: int) -> bytes:
    out = bytearray()
    while len(out) < limit:
        chunk = src.read(min(1 << 16, limit - len(out)))
        if not chunk:
            break
        out += chunk
    if len(out) >= limit:
        raise OmniError(f"companion larger than {meta.MAX_DOCUMENT} bytes", errno=errno.E2BIG)
    return bytes(out)
