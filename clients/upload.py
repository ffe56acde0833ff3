"""An adapter directory as the message stream of one RegisterAdapter call, read lazily; used by both clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from quiver.v1 import adapters_pb2 as apb


def adapter_files(directory: Path) -> list[Path]:
    """The regular files directly in `directory`, sorted by name; hidden files and subdirectories are skipped.

    Raises FileNotFoundError or NotADirectoryError for a path that is not a directory.
    """
    if not directory.is_dir():
        if not directory.exists():
            raise FileNotFoundError(f"{directory}: no such directory")
        raise NotADirectoryError(f"{directory}: not a directory")
    return sorted((p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name)


class Upload:
    """The requests of one RegisterAdapter call: the options, then each file in chunks of at most `chunk_size` bytes.

    The files are listed when the Upload is made, so a wrong directory fails before any call starts; their
    contents are read one chunk at a time as gRPC consumes the requests, never a whole file at once. gRPC
    answers an exception raised while it iterates requests only by cancelling the call, so an OSError from
    reading is kept in `read_error` for the client to raise instead.
    """

    def __init__(self, directory: str | Path, options: apb.RegistrationOptions, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
        self.files = adapter_files(Path(directory))
        self.read_error: OSError | None = None
        self._options = options
        self._chunk_size = chunk_size

    def __iter__(self) -> Iterator[apb.RegisterAdapterRequest]:
        yield apb.RegisterAdapterRequest(options=self._options)
        try:
            for path in self.files:
                yield from self._chunks(path)
        except OSError as e:
            self.read_error = e
            raise

    async def in_threads(self) -> AsyncIterator[apb.RegisterAdapterRequest]:
        """The same requests for grpc.aio, each read on a worker thread so no read stalls the event loop."""
        requests = iter(self)
        while (request := await asyncio.to_thread(next, requests, None)) is not None:
            yield request

    def _chunks(self, path: Path) -> Iterator[apb.RegisterAdapterRequest]:
        with path.open("rb", buffering=0) as f:  # Unbuffered: nothing is read ahead of the chunk sent.
            data = f.read(self._chunk_size)
            # Always one chunk at least, so that an empty file arrives too.
            yield apb.RegisterAdapterRequest(chunk=apb.FileChunk(file_name=path.name, data=data))
            while data := f.read(self._chunk_size):
                yield apb.RegisterAdapterRequest(chunk=apb.FileChunk(file_name=path.name, data=data))
