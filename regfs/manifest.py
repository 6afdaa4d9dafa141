"""`.dir` manifests, parsed into a packed form: a million entries cost tens of megabytes, not hundreds.

A `.dir` object is a JSON list of `{"md5", "relpath", "size"?, "isexec"?}` objects, one per file of a
directory output, sorted by relpath (DVC writes it so). `parse_manifest` reads it a chunk at a time
(each chunk decoded by `json` in one call) and keeps, per entry: its relpath as UTF-8 bytes in one
shared buffer, its 16-byte digest, its size (-1: unknown) and its exec bit, in relpath byte order. A
directory of the output is then one contiguous range of entries (`Listing`), searched by bisection;
the caller makes nodes only for the names it looks up. Sizes learned later (`fill_sizes`) go into the
same array, so a manifest shared by many commits learns them once; once all are known, they can be
kept as one record (`sizes_record`) that a later process loads whole (`load_sizes`). The packed
form itself can be kept as one record too (`packed_record`), which a later process loads without
the JSON (`load_packed`), checking it entry by entry as a parse does.

Manifests are untrusted input. JSON that does not parse, a top level that is not a list, an entry
that is not an object, a relpath that is unsafe (see `dvcmeta.is_safe_relpath`), an md5 that is not 32
lowercase hex digits, a duplicate relpath, or a path that is both a file and a directory fails the
whole manifest with MetafileError. A size that is not a non-negative 64-bit integer is no size; only
`"isexec": true` makes a file executable. A manifest in another order than relpath bytes (DVC sorts
by code point, which differs only for undecodable names) is sorted here, at the cost of memory.
"""

import codecs
import hashlib
import io
import json
import re
import reprlib
import sys
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, islice, repeat
from operator import add, eq, is_, itemgetter, lt, methodcaller
from typing import BinaryIO

from regfs.dvcmeta import MAX_SIZE, check_entry
from regfs.errors import MetafileError

_CHUNK = 1 << 20  # bytes read at a time
_ROWS = 256  # entries listed at a time
_KEPT_ENTRIES = 64
_STRIDE = 32  # keys per sampled key in a search (`_Keys.search`)
_DIGEST = 16
_WHITESPACE = " \t\n\r"  # JSON's
_COMMA = re.compile(r"[ \t\n\r]*,")
# In relpaths joined and framed by NULs, only an unsafe relpath makes one of these: an empty one, a
# leading, trailing or double slash, a `.` or `..` component.
_UNSAFE = ("\0\0", "\0/", "/\0", "//")
_UNSAFE_DOTS = tuple(f"{before}{dots}{after}" for dots in (".", "..") for before in "\0/" for after in "\0/")
_GET_RELPATH, _GET_MD5 = methodcaller("get", "relpath"), methodcaller("get", "md5")
_GET_SIZE, _GET_EXEC = methodcaller("get", "size"), methodcaller("get", "isexec")
_PARENT = methodcaller("rpartition", b"/")
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 80, 80
_RECORD_MAGIC = b"regfs manifest sizes 1\0"
_PACKED_MAGIC = b"regfs packed manifest 1\0"
_RECORD_DIGEST = 16  # blake2b's, over everything before it

# What a directory listing says of one entry: its name, kind ("file" or "dir"), size (None: not
# known yet) and exec bit.
Row = tuple[str, str, int | None, bool]


@dataclass(frozen=True)
class DirEntry:
    relpath: str
    object_id: str
    is_exec: bool = False
    size: int | None = None


class Manifest:
    """The entries of one `.dir` object, in relpath byte order (see the module docstring)."""

    def __init__(self, paths: bytes, bounds: array, digests: bytes, sizes: array, exec_bits: bytes):
        # Entry i's relpath is paths[bounds[i]:bounds[i + 1] - 1]: each is followed by a NUL.
        self._paths, self._bounds, self._digests = paths, bounds, digests
        self._sizes, self._exec_bits = sizes, exec_bits
        self.keys = _Keys(paths, bounds)
        self._listed: dict[bytes, Sequence[int]] = {}  # a directory's prefix -> its children's first entries

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self) -> Iterator[DirEntry]:
        return map(self.entry, range(len(self)))

    @property
    def nbytes(self) -> int:
        """About the memory the manifest holds."""
        return (len(self._paths) + len(self._digests) + len(self._exec_bits)
                + self._bounds.itemsize * len(self._bounds) + self._sizes.itemsize * len(self._sizes))

    def entry(self, index: int) -> DirEntry:
        relpath = self.keys[index].decode("utf-8", "surrogateescape")
        return DirEntry(relpath, self.object_id(index), self.is_exec(index), self.size(index))

    def object_id(self, index: int) -> str:
        return self._digests[index * _DIGEST:(index + 1) * _DIGEST].hex()

    def size(self, index: int) -> int | None:
        size = self._sizes[index]
        return None if size < 0 else size

    def is_exec(self, index: int) -> bool:
        return bool(self._exec_bits[index])

    def root(self) -> "Listing":
        return Listing(self, b"", 0, len(self))

    def files(self, prefix: bytes, low: int, high: int) -> Iterator[Row]:
        """The rows of entries low..high, all files directly below `prefix`."""
        region = self._paths[self._bounds[low] + len(prefix):self._bounds[high] - 1]
        if prefix:
            region = region.replace(b"\0" + prefix, b"\0")
        names = region.decode("utf-8", "surrogateescape").split("\0")
        sizes = self._sizes[low:high]
        known = sizes.tolist() if sizes.count(-1) == 0 else [None if size < 0 else size for size in sizes]
        return zip(names, repeat("file"), known, map(bool, self._exec_bits[low:high]))

    def fill_sizes(self, sizes_of: Callable[[list[str]], dict[str, int]], batch: int = 20_000) -> None:
        """Sizes for the entries that have none, from `sizes_of(object_ids)` (a dict of the ones it
        knows), asked `batch` entries at a time so that no call holds a million ids."""
        sizes = self._sizes
        for begin in range(0, len(self), batch):
            end = min(len(self), begin + batch)
            unknown = sizes[begin:end].count(-1)
            if not unknown:
                continue
            text = self._digests[begin * _DIGEST:end * _DIGEST].hex()
            ids = list(map(text.__getitem__, map(slice, range(0, len(text), 32), range(32, len(text) + 32, 32))))
            if unknown == end - begin:
                known = sizes_of(list(dict.fromkeys(ids)))
                sizes[begin:end] = array("q", map(known.get, ids, repeat(-1)))
                continue
            missing = [(begin + offset, object_id) for offset, object_id in enumerate(ids) if sizes[begin + offset] < 0]
            known = sizes_of(list(dict.fromkeys(object_id for _, object_id in missing)))
            for index, object_id in missing:
                sizes[index] = known.get(object_id, -1)

    def sizes_known(self) -> bool:
        return self._sizes.count(-1) == 0

    def sizes_record(self, identity: str) -> bytes:
        """Every entry's size as one record for `load_sizes`: a header (magic, `identity` naming
        the manifest, entry count), the sizes in entry order as little-endian int64, and a digest
        of all that, so a record damaged in any byte is refused."""
        sizes = self._sizes
        if sys.byteorder == "big":
            sizes = array("q", sizes)
            sizes.byteswap()
        record = bytearray(_record_header(identity))  # built in place: 8 MB for a million entries
        record += len(self).to_bytes(8, "little")
        record += sizes
        record += hashlib.blake2b(record, digest_size=_RECORD_DIGEST).digest()
        return bytes(record)

    def load_sizes(self, record: bytes, identity: str) -> None:
        """Every entry's size from a `sizes_record` of this manifest (`identity`); raises
        ValueError, saying why, for anything else: another manifest's record, a truncated or
        damaged one, sizes out of range or other than those the manifest itself records."""
        header = _record_header(identity)
        if not record.startswith(_RECORD_MAGIC):
            raise ValueError("not a record of manifest sizes")
        if not record.startswith(header):
            raise ValueError("the record of another manifest")
        expected = len(header) + 8 + 8 * len(self) + _RECORD_DIGEST
        if len(record) != expected:
            raise ValueError(f"{len(record)} bytes instead of {expected}")
        body = memoryview(record)[:-_RECORD_DIGEST]
        if hashlib.blake2b(body, digest_size=_RECORD_DIGEST).digest() != record[-_RECORD_DIGEST:]:
            raise ValueError("its digest does not match its bytes")
        if int.from_bytes(body[len(header):len(header) + 8], "little") != len(self):
            raise ValueError(f"it counts another number of entries than {len(self)}")
        sizes = array("q")
        sizes.frombytes(body[len(header) + 8:])
        if sys.byteorder == "big":
            sizes.byteswap()
        if len(self) and (min(sizes) < 0 or max(sizes) > MAX_SIZE):
            raise ValueError("it holds a size out of range")
        own = self._sizes
        if own.count(-1) != len(self) and any(map(_differs, own, sizes)):
            raise ValueError("its sizes differ from those in the manifest")
        own[:] = sizes

    def packed_record(self, identity: str) -> bytes:
        """The whole manifest as one record for `load_packed`: a header (magic, `identity` naming
        the manifest, entry count, bytes of relpaths), the relpaths (each followed by a NUL), the
        digests, the sizes as little-endian int64 (-1: unknown), the exec bits, and a digest of
        all that. Loading it skips the JSON, which is most of the cost of a parse."""
        return b"".join(self.packed_parts(identity))

    def packed_parts(self, identity: str) -> list:
        """`packed_record` in the pieces that make it up, in order, most of them the manifest's own
        buffers: written one after the other, a million-entry record is never copied whole."""
        sizes = memoryview(self._sizes).cast("B")
        if sys.byteorder == "big":
            swapped = array("q", self._sizes)
            swapped.byteswap()
            sizes = memoryview(swapped).cast("B")
        parts = [_PACKED_MAGIC + identity.encode("utf-8", "surrogateescape") + b"\0"
                 + len(self).to_bytes(8, "little") + len(self._paths).to_bytes(8, "little"),
                 self._paths, self._digests, sizes, self._exec_bits]
        digest = hashlib.blake2b(digest_size=_RECORD_DIGEST)
        for part in parts:
            digest.update(part)
        return [*parts, digest.digest()]

    def children(self, prefix: bytes, low: int, high: int) -> Sequence[int]:
        """The first entry of each child of the directory `prefix` (entries low..high): a file's
        entry, or the first entry below a subdirectory. Kept for directories of many entries (a
        listing asks again for each reply), so at most one per _KEPT_ENTRIES entries."""
        if high - low < _KEPT_ENTRIES:
            return self._scan(prefix, low, high)
        starts = self._listed.get(prefix)
        if starts is None:
            starts = self._listed[prefix] = self._scan(prefix, low, high)
        return starts

    def _scan(self, prefix: bytes, low: int, high: int) -> Sequence[int]:
        depth = prefix.count(b"/")
        if self._paths.count(b"/", self._bounds[low], self._bounds[high]) == depth * (high - low):
            return range(low, high)  # no subdirectory: every entry is a child
        starts, index = array("Q"), low
        while index < high:
            starts.append(index)
            key = self.keys[index]
            slash = key.find(b"/", len(prefix))
            # A subdirectory's entries are those that start with its path and "/" ("0" follows "/").
            index = index + 1 if slash < 0 else self.keys.search(key[:slash] + b"0", index + 1, high)
        return starts


class _Keys(Sequence):
    """The relpaths of a manifest as a sequence of bytes, searched by bisection (`search`)."""

    def __init__(self, paths: bytes, bounds: array):
        self._paths, self._bounds = paths, bounds
        self._sample: list[bytes] | None = None  # every _STRIDE-th key, made on the first search

    def __len__(self) -> int:
        return len(self._bounds) - 1

    def __getitem__(self, index: int) -> bytes:
        return self._paths[self._bounds[index]:self._bounds[index + 1] - 1]

    def search(self, key: bytes, low: int, high: int) -> int:
        """`bisect_left(self, key, low, high)`, mostly in C: a bisection of the sample of keys
        narrows it to _STRIDE entries, so a search of a million keys calls `__getitem__` about 6
        times instead of 20 (each lookup of a path makes one to three searches per component)."""
        sample = self._sample
        if sample is None:
            sample = self._sample = list(map(self.__getitem__, range(0, len(self), _STRIDE)))
        # keys[(step - 1) * _STRIDE] < key <= keys[step * _STRIDE]: the first key >= `key` lies
        # between, and the one within low..high is that, clamped.
        step = bisect_left(sample, key)
        first = bisect_left(self, key, max(0, (step - 1) * _STRIDE + 1), min(len(self), step * _STRIDE))
        return min(max(first, low), high)


class Listing:
    """One directory of a manifest: the entries low..high, whose relpaths start with `prefix`."""

    def __init__(self, manifest: Manifest, prefix: bytes, low: int, high: int):
        self.manifest, self._prefix, self._low, self._high = manifest, prefix, low, high

    def lookup(self, name: str) -> "int | Listing | None":
        """The entry index of the file `name`, the Listing of the directory `name`, or None."""
        try:
            encoded = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return None
        if not encoded or b"/" in encoded or b"\0" in encoded:
            return None
        keys, key = self.manifest.keys, self._prefix + encoded
        index = keys.search(key, self._low, self._high)
        if index < self._high and keys[index] == key:
            return index
        below = key + b"/"
        index = keys.search(below, index, self._high)
        if index < self._high and keys[index].startswith(below):
            return Listing(self.manifest, below, index, keys.search(key + b"0", index, self._high))
        return None

    def __len__(self) -> int:
        return len(self._starts())

    def names(self) -> Iterator[str]:
        return (row[0] for row in self.rows())

    def rows(self, start: int = 0) -> Iterator[Row]:
        """The children from the `start`th on, in relpath byte order."""
        starts = self._starts()
        if isinstance(starts, range):  # files only: taken a slice of the arrays at a time
            for low in range(self._low + start, self._high, _ROWS):
                yield from self.manifest.files(self._prefix, low, min(self._high, low + _ROWS))
            return
        manifest, length = self.manifest, len(self._prefix)
        for position in range(start, len(starts)):
            index = starts[position]
            key = manifest.keys[index]
            slash = key.find(b"/", length)
            if slash < 0:
                yield key[length:].decode("utf-8", "surrogateescape"), "file", manifest.size(index), \
                    manifest.is_exec(index)
            else:
                yield key[length:slash].decode("utf-8", "surrogateescape"), "dir", 0, False

    def _starts(self) -> Sequence[int]:
        return self.manifest.children(self._prefix, self._low, self._high)


def parse_manifest(source: bytes | BinaryIO, what: str) -> Manifest:
    """The manifest in `source` (its bytes, or a binary file read to its end); raises MetafileError."""
    builder = _Builder(what)
    for items in _batches(io.BytesIO(source) if isinstance(source, bytes) else source, what):
        builder.add(items)
    return builder.finish()


def load_packed(record: bytes, identity: str, what: str) -> Manifest:
    """The manifest a `packed_record` of `identity` holds, checked as a parse checks one (safe
    relpaths in order, no duplicate, no file that is also a directory, sizes in range): a record
    made by anyone but regfs is no more trusted than the JSON. Raises ValueError, saying why, for
    a record that is not exactly one of `identity` or whose content fails those checks."""
    header = _PACKED_MAGIC + identity.encode("utf-8", "surrogateescape") + b"\0"
    if not record.startswith(_PACKED_MAGIC):
        raise ValueError("not a packed manifest")
    if not record.startswith(header):
        raise ValueError("the record of another manifest")
    view = memoryview(record)
    if len(record) < len(header) + 16 + _RECORD_DIGEST or hashlib.blake2b(
            view[:-_RECORD_DIGEST], digest_size=_RECORD_DIGEST).digest() != record[-_RECORD_DIGEST:]:
        raise ValueError("truncated, or its digest does not match its bytes")
    count = int.from_bytes(view[len(header):len(header) + 8], "little")
    path_bytes = int.from_bytes(view[len(header) + 8:len(header) + 16], "little")
    start = len(header) + 16
    ends = list(accumulate((path_bytes, _DIGEST * count, 8 * count, count), initial=start))
    if ends[-1] != len(record) - _RECORD_DIGEST:
        raise ValueError(f"{len(record)} bytes do not hold {count} entries and {path_bytes} bytes of relpaths")
    paths, digests, exec_bits = record[ends[0]:ends[1]], record[ends[1]:ends[2]], record[ends[3]:ends[4]]
    sizes = array("q")
    sizes.frombytes(view[ends[2]:ends[3]])
    if sys.byteorder == "big":
        sizes.byteswap()
    if paths.count(b"\0") != count or (count and not paths.endswith(b"\0")):
        raise ValueError(f"its relpaths are not {count} NUL-terminated names")
    if count and (min(sizes) < -1 or max(sizes) > MAX_SIZE or max(exec_bits) > 1):
        raise ValueError("it holds a size or an exec bit out of range")
    builder, position, index = _Builder(what), 0, 0
    try:
        while index < count:  # a megabyte of relpaths at a time, cut after a name
            end = paths.rfind(b"\0", position, position + _CHUNK)
            if end < position:  # one name longer than that
                end = paths.index(b"\0", position)
            relpaths = paths[position:end]
            entries = relpaths.count(b"\0") + 1
            if not _all_safe("\0" + relpaths.decode("utf-8", "surrogateescape") + "\0"):
                raise ValueError("it holds an unsafe relpath")
            builder.add_packed(relpaths, digests[index * _DIGEST:(index + entries) * _DIGEST],
                               sizes[index:index + entries], exec_bits[index:index + entries])
            position, index = end + 1, index + entries
        return builder.finish()
    except MetafileError as exc:
        raise ValueError(str(exc)) from exc


class _Text:
    """The decoded text of a stream, read a chunk at a time (JSON's encodings, as `json.loads`)."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        head = stream.read(_CHUNK)
        self._decoder = codecs.getincrementaldecoder(json.detect_encoding(head))("surrogatepass")
        self.text, self.eof, self.consumed = "", False, 0
        self._feed(head)

    def more(self) -> bool:
        if self.eof:
            return False
        self._feed(self._stream.read(_CHUNK))
        return True

    def drop(self, count: int) -> None:
        self.text, self.consumed = self.text[count:], self.consumed + count

    def _feed(self, data: bytes) -> None:
        self.eof = not data
        self.text += self._decoder.decode(data, final=self.eof)


def _batches(stream: BinaryIO, what: str) -> Iterator[list]:
    """The items of the top-level JSON list in `stream`, a list of them at a time, in order.

    Each batch is the text up to the last `}` followed by a comma, parsed as a list in one call.
    That parse succeeds only when the cut is between two items of the top-level list (a cut inside
    a string or a nested value leaves something open), so the batches together accept exactly
    what parsing the whole text accepts; a failed parse just waits for more text.
    """
    try:
        text = _Text(stream)
        while not text.text.lstrip(_WHITESPACE) and text.more():
            pass
        if not text.text.lstrip(_WHITESPACE).startswith("["):
            yield _whole(text, what)
            return
        text.drop(text.text.index("[") + 1)
        after_comma, wanted = False, 0
        while True:
            cut = _last_cut(text.text) if len(text.text) >= wanted else None
            if cut is not None:
                try:
                    items = json.loads("[" + text.text[:cut[0]] + "]")
                except (ValueError, RecursionError):
                    wanted = 2 * len(text.text)  # keeps the parses linear whatever the text
                else:
                    text.drop(cut[1])
                    after_comma, wanted = True, 0
                    yield items
                    continue
            if not text.more():
                break
        items = json.loads("[" + text.text)
        if after_comma and not items:  # "..., ]"
            raise json.JSONDecodeError("Expecting value", "[" + text.text, len(text.text))
        yield items
    except json.JSONDecodeError as exc:
        position = text.consumed + exc.pos - 1
        raise MetafileError(f"{what}: manifest is not valid JSON ({exc.msg} at character {position})") from exc
    except (ValueError, RecursionError) as exc:  # undecodable bytes; nesting deeper than the stack
        raise MetafileError(f"{what}: manifest is not valid JSON ({_first_line(exc)})") from exc


def _last_cut(text: str) -> tuple[int, int] | None:
    """Where the text may end after an item of the list: the last `}` followed by a comma (the
    index after the `}`, and the one after the comma)."""
    end = len(text)
    while (brace := text.rfind("}", 0, end)) >= 0:
        comma = _COMMA.match(text, brace + 1)
        if comma is not None:
            return brace + 1, comma.end()
        end = brace
    return None


def _whole(text: "_Text", what: str) -> list:
    """A manifest that does not start with a list: parsed whole for the right message."""
    while text.more():
        pass
    try:
        value = json.loads(text.text)
    except (ValueError, RecursionError) as exc:
        raise MetafileError(f"{what}: manifest is not valid JSON ({_first_line(exc)})") from exc
    raise MetafileError(f"{what}: manifest is not a JSON list ({_short(value)})")


class _Builder:
    """Checks a manifest's items batch by batch and packs them (see the module docstring)."""

    def __init__(self, what: str):
        self.what = what
        self.paths, self.bounds, self.digests = bytearray(), array("Q", [0]), bytearray()
        self.sizes, self.exec_bits = array("q"), bytearray()
        self.parents: set[bytes] = set()
        self.last: bytes | None = None
        self.in_order = True

    def add(self, items: list) -> None:
        if not items:
            return
        relpaths, digests = _checked(items, self.what)
        self.add_packed(relpaths, digests, _sizes(items), bytes(map(is_, map(_GET_EXEC, items), repeat(True))))

    def add_packed(self, relpaths: bytes, digests: bytes, sizes: array, exec_bits: bytes) -> None:
        """Entries already checked one by one: relpaths (safe, UTF-8, joined by NULs), their 16-byte
        digests, sizes (-1: unknown) and exec bits (0 or 1)."""
        paths = relpaths.split(b"\0")
        first = paths[0]
        if self.in_order and not ((self.last is None or self.last < first)
                                  and all(map(lt, paths, islice(paths, 1, None)))):
            self.in_order = False
        self.last = paths[-1]
        self.paths += relpaths
        self.paths += b"\0"
        self.bounds.extend(islice(accumulate(map(add, map(len, paths), repeat(1)), initial=self.bounds[-1]),
                                  1, None))
        self.digests += digests
        self.sizes.extend(sizes)
        self.exec_bits += exec_bits
        if b"/" in relpaths:
            self.parents.update(map(itemgetter(0), map(_PARENT, paths)))

    def finish(self) -> Manifest:
        manifest = Manifest(bytes(self.paths), self.bounds, bytes(self.digests), self.sizes, bytes(self.exec_bits))
        if not self.in_order:
            manifest = _sorted(manifest, self.what)
        self._check_no_file_is_a_directory(manifest)
        return manifest

    def _check_no_file_is_a_directory(self, manifest: Manifest) -> None:
        directories: set[bytes] = set()
        for parent in self.parents:
            while parent and parent not in directories:  # an ancestor seen before: so were its own
                directories.add(parent)
                parent = parent.rpartition(b"/")[0]
        if not directories:
            return
        paths, bounds, both = manifest._paths, manifest._bounds, set()
        for begin in range(0, len(manifest), 65536):
            end = min(len(manifest), begin + 65536)
            both.update(directories.intersection(paths[bounds[begin]:bounds[end] - 1].split(b"\0")))
        if both:
            relpath = min(both).decode("utf-8", "surrogateescape")
            raise MetafileError(f"{self.what}: {relpath!r} is both a file and a directory in manifest")


def _checked(items: list, what: str) -> tuple[bytes, bytes]:
    """The relpaths of `items` (UTF-8, joined by NULs) and their digests, each checked; the first
    bad item fails them all, as found in order."""
    if set(map(type, items)) == {dict}:
        relpaths, object_ids = list(map(_GET_RELPATH, items)), list(map(_GET_MD5, items))
        if set(map(type, relpaths)) == {str} and set(map(type, object_ids)) == {str}:
            joined, digests = "\0" + "\0".join(relpaths) + "\0", _digests(object_ids)
            if digests is not None and joined.count("\0") == len(items) + 1 and _all_safe(joined):
                try:
                    return joined[1:-1].encode("utf-8", "surrogateescape"), digests
                except UnicodeEncodeError:
                    pass
    for item in items:  # one of them is bad: find the first, for its message
        check_entry(item, what)
    raise AssertionError("a manifest batch failed its checks but none of its items did")


def _all_safe(joined: str) -> bool:
    """Whether relpaths joined and framed by NULs are all safe (no NUL in any of them: checked)."""
    if any(part in joined for part in _UNSAFE):
        return False
    # A `.` or `..` component starts with a dot after a separator; most manifests have none.
    return not ("/." in joined or "\0." in joined) or not any(part in joined for part in _UNSAFE_DOTS)


def _digests(object_ids: list[str]) -> bytes | None:
    """The md5s as 16 bytes each, or None unless each is 32 lowercase hex digits."""
    text = " ".join(object_ids) + " "
    if len(text) != 33 * len(object_ids) or text[32::33] != " " * len(object_ids) or text.lower() != text:
        return None
    try:
        digests = bytes.fromhex(text)
    except ValueError:
        return None
    return digests if len(digests) == _DIGEST * len(object_ids) else None


def _sizes(items: list) -> array:
    sizes = list(map(_GET_SIZE, items))
    kinds = set(map(type, sizes))
    if kinds == {type(None)}:
        return array("q", repeat(-1, len(sizes)))
    if kinds == {int} and min(sizes) >= 0 and max(sizes) <= MAX_SIZE:
        return array("q", sizes)
    return array("q", [size if type(size) is int and 0 <= size <= MAX_SIZE else -1 for size in sizes])


def _sorted(manifest: Manifest, what: str) -> Manifest:
    """The same entries in relpath byte order; a duplicate relpath fails the manifest."""
    keys = manifest._paths[:-1].split(b"\0")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    keys = list(map(keys.__getitem__, order))
    duplicate = next((key for key, same in zip(keys, map(eq, keys, islice(keys, 1, None))) if same), None)
    if duplicate is not None:
        relpath = duplicate.decode("utf-8", "surrogateescape")
        raise MetafileError(f"{what}: duplicate relpath {relpath!r} in manifest")
    bounds = array("Q", [0])
    bounds.extend(accumulate(map(add, map(len, keys), repeat(1))))
    digests = manifest._digests
    pieces = list(map(digests.__getitem__, map(slice, range(0, len(digests), _DIGEST),
                                                range(_DIGEST, len(digests) + _DIGEST, _DIGEST))))
    return Manifest(b"\0".join(keys) + b"\0", bounds, b"".join(map(pieces.__getitem__, order)),
                    array("q", map(manifest._sizes.__getitem__, order)),
                    bytes(map(manifest._exec_bits.__getitem__, order)))


def _record_header(identity: str) -> bytes:
    return _RECORD_MAGIC + identity.encode("utf-8", "surrogateescape") + b"\0"


def _differs(recorded: int, loaded: int) -> bool:
    return recorded >= 0 and recorded != loaded


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _short(value) -> str:
    """A repr of untrusted data, shortened without ever formatting all of it."""
    return _SHORT.repr(value)
