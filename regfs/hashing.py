"""Object hashing as DVC computes it, to verify every download before it becomes visible.

`md5` (DVC 3, `hash: md5`): plain md5 of the bytes. `md5-dos2unix` (DVC 2, no `hash` field): if
the first 512 bytes look like text, md5 of the bytes with CRLF replaced by LF inside each 1 MiB
read separately (a CRLF split by a chunk boundary stays, as in DVC 2.x `file_md5`); binary files
get plain md5. See ../shared/dvc-format.md section 5.
"""

import hashlib

from regfs.dvcmeta import HASH_LEGACY

CHUNK = 1 << 20  # DVC 2.x LOCAL_CHUNK_SIZE: the unit of CRLF normalisation
_TEXT_BYTES = bytes(range(32, 127)) + b"\n\r\t\f\b"


def is_text(head: bytes) -> bool:
    """DVC 2.x `istextblock` on the first 512 bytes of a file."""
    block = head[:512]
    if not block:
        return True
    if b"\x00" in block:
        return False
    return len(block.translate(None, _TEXT_BYTES)) / len(block) <= 0.30


class StreamHasher:
    """Hashes bytes fed in chunks of any size, with the algorithm `hash_name` names."""

    def __init__(self, hash_name: str):
        self._md5 = hashlib.md5()
        self._dos2unix = hash_name == HASH_LEGACY
        self._pending = bytearray()
        self._text: bool | None = None
        self._done = False

    def update(self, data: bytes) -> None:
        if not self._dos2unix:
            self._md5.update(data)
            return
        self._pending += data
        while len(self._pending) >= CHUNK:
            self._digest_chunk(bytes(self._pending[:CHUNK]))
            del self._pending[:CHUNK]

    def hexdigest(self) -> str:
        if self._dos2unix and not self._done and (self._pending or self._text is None):
            self._digest_chunk(bytes(self._pending))
            self._pending.clear()
        self._done = True
        return self._md5.hexdigest()

    def _digest_chunk(self, chunk: bytes) -> None:
        if self._text is None:
            self._text = is_text(chunk)
        self._md5.update(chunk.replace(b"\r\n", b"\n") if self._text else chunk)


def file_hash(path: str, hash_name: str) -> str:
    hasher = StreamHasher(hash_name)
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()
