"""A file object on a file's bytes while it is being cached (``open_stream``)."""

import io
from typing import Any, Optional

from . import _native


class FileReader(io.RawIOBase):
    """The raw reader under :meth:`ImageCacheManager.open_stream`: reads start with the
    download's first bytes, wait for the rest, and end (``b""``) only after the file is
    committed; a failed download raises its :class:`CacheError` from ``read``."""

    def __init__(self, stream: "_native.Stream") -> None:
        super().__init__()
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        chunk = self._stream.read(len(view))
        n = len(chunk)
        view[:n] = chunk
        return n

    @property
    def length(self) -> Optional[int]:
        """The file's length when known (the origin's, while downloading)."""
        return self._stream.len

    @property
    def status(self) -> str:
        """``"hit"``, ``"downloaded"`` or ``"coalesced"``."""
        return self._stream.status

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()
