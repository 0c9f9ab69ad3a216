"""Where computed sequences go: a store writer on a background thread, or in a child process.

The device loop only hands over finished batches. Validation, top-k encoding and Blosc compression then run
elsewhere: on a background thread (the default), or in a separate writer process, which shares no GIL with the
thread that launches the kernels but pays for moving the arrays through a pipe. Both keep the store protocol of `TeacherStoreWriter`: what was committed is durable, a
crash loses at most the uncommitted tail, and errors surface in the caller with their original message.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Mapping

import numpy as np

from cdm.errors import OptionError

WRITER_MODES = ("auto", "thread", "process")


def resolve_writer_mode(mode: str, device: str) -> str:
    """'auto' -> 'thread' on every device for now: in benchmarks/RESULTS.md the thread writer had the higher
    throughput (H200 host, session 2; 2-core CPU, session 3: ~1.6x). The process writer keeps a loop beside it
    faster (device-bound loop 0.89 vs 0.81 of its solo speed on 2 cores) but pays a pipe transfer; it is opt-in
    (`--writer process`) until it is measured on a many-core GPU host."""
    if mode not in WRITER_MODES:
        raise OptionError(f"--writer must be one of {WRITER_MODES}, got {mode!r}")
    return "thread" if mode == "auto" else mode


def write_item(writer: Any, data_fp: str, item: tuple[Any, ...]) -> None:
    """Apply one sink message to a TeacherStoreWriter: ("skip", index, reason) or ("add", items, results)."""
    from cdm.precompute.data import seq_id
    from cdm.storage import TeacherSequence

    if item[0] == "skip":
        writer.skip(item[1], item[2])
        return
    for (i, e), r in zip(item[1], item[2]):
        ids, lps, lse, ent = as_numpy([r])[0] if hasattr(r, "ids") else r
        writer.add(TeacherSequence(
            seq_id=seq_id(data_fp, i), text=e.text, response_spans=e.response_spans, source_index=i,
            truncated=e.truncated, token_ids=e.token_ids, char_spans=e.char_spans,
            topk_ids=ids, topk_logprobs=lps, logsumexp=lse, entropy=ent))


def as_numpy(results: Any) -> list[tuple[np.ndarray, ...]]:
    """Per-sequence TopK (host tensors) -> tuples of numpy arrays (picklable without torch's shared memory)."""
    return [tuple(t.numpy() for t in (r.ids, r.logprobs, r.logsumexp, r.entropy)) for r in results]


class ThreadQueue:
    """Runs `fn(item)` for each put item on one background thread; the first error re-raises in put()/close()."""

    def __init__(self, fn: Callable[[Any], None], depth: int = 4, name: str = "cdm-store-writer"):
        self._fn = fn
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._err: BaseException | None = None
        self.blocked_s = 0.0  # time put() waited for room: the consumer is slower than the producer
        self._t = threading.Thread(target=self._loop, name=name, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._err is None:
                try:
                    self._fn(item)
                except BaseException as e:  # surfaced by put()/close()
                    self._err = e

    def put(self, item: Any) -> None:
        if self._err is not None:
            raise self._err
        t = time.perf_counter()
        self._q.put(item)
        self.blocked_s += time.perf_counter() - t

    def close(self) -> None:
        self._q.put(None)
        self._t.join()
        if self._err is not None:
            raise self._err


SWITCH_INTERVAL_S = 0.001  # the GIL hand-over interval while a ThreadSink is open (CPython's default is 5 ms)


class _SwitchInterval:
    """Lower sys.setswitchinterval while at least one holder needs it; the interval from before the first holder
    comes back when the last one releases (sinks may overlap, e.g. several shards written from threads)."""

    _lock = threading.Lock()
    _holders = 0
    _saved = 0.0

    @classmethod
    def acquire(cls, interval: float) -> None:
        if not interval > 0:
            raise ValueError(f"switch interval must be positive, got {interval}")
        with cls._lock:
            if cls._holders == 0:
                cls._saved = sys.getswitchinterval()
            sys.setswitchinterval(min(sys.getswitchinterval(), interval))
            cls._holders += 1

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._holders -= 1
            if cls._holders == 0:
                sys.setswitchinterval(cls._saved)


class ThreadSink:
    """The writer in this process, fed by a background thread.

    While it is open the interpreter's GIL switch interval is lowered to `switch_interval` (restored on close):
    the device loop gets the GIL back after each device wait within ~1 ms instead of up to 5 ms while the writer
    thread runs Python code (in benchmarks/precompute.py --part writer this keeps a GPU-like loop faster)."""

    mode = "thread"

    def __init__(self, writer: Any, data_fp: str, switch_interval: float | None = SWITCH_INTERVAL_S):
        self._writer = writer
        self._switch = False
        if switch_interval is not None:
            _SwitchInterval.acquire(switch_interval)
            self._switch = True
        try:
            self._q = ThreadQueue(lambda item: write_item(writer, data_fp, item))
        except BaseException:
            self._release_switch()
            raise

    def _release_switch(self) -> None:
        if self._switch:
            self._switch = False
            _SwitchInterval.release()

    def put(self, item: tuple[Any, ...]) -> None:
        self._q.put(item)

    @property
    def blocked_s(self) -> float:
        """Seconds put() waited because the writer was behind."""
        return self._q.blocked_s

    def _drain(self) -> None:
        try:
            self._q.close()
        finally:
            self._release_switch()

    def close(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Drain, finish the shard; (manifest, writer stats). On a writer error, commit what was added before it
        (the shard stays resumable) and re-raise."""
        try:
            self._drain()
        except BaseException:
            self._writer.commit()
            raise
        return self._writer.close(), self._writer.stats

    def abort(self) -> None:
        """Drain what was handed over and commit it (the shard stays resumable); errors here are secondary."""
        try:
            self._drain()
        except BaseException:
            pass
        self._writer.commit()


def _die_with_parent(parent: int) -> None:
    """Linux: the writer process gets SIGKILL when its parent dies, so no orphan writes behind a resumed run."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


def _warm_up() -> None:
    """Import what the first commit needs (Parquet, the codecs, Blosc, torch) before the parent is told 'ready'."""
    import io

    import numcodecs  # noqa: F401
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zarr
    import zarr.codecs  # noqa: F401

    from cdm.storage.topk_codec import _to_f16

    pq.write_table(pa.table({"x": [1]}), io.BytesIO())
    zarr.create_array(store={}, shape=(4,), chunks=(4,), dtype="int32", compressors=[zarr.codecs.BloscCodec()])[:] = 1
    _to_f16(np.zeros((1, 1), np.float32))  # imports torch (the encoder's fp16 conversion) before "ready"


def _writer_process(conn: Any, parent: int, writer_kwargs: Mapping[str, Any], data_fp: str) -> None:
    """Child main loop: open the shard writer, apply messages, answer 'close'/'abort' with the outcome."""
    _die_with_parent(parent)
    error: tuple[Any, str] | None = None
    writer = None
    try:
        from cdm.storage import TeacherStoreWriter

        writer = TeacherStoreWriter(**writer_kwargs)
        _warm_up()
    except BaseException as e:
        conn.send(("error", _picklable(e), traceback.format_exc()))
        return
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        kind = msg[0]
        if kind == "add-raw":  # receive the arrays into place, then handle like "add"
            flat = []
            for shape, dtype in msg[2]:
                buf = np.empty(shape, dtype=np.dtype(dtype))
                if buf.nbytes:
                    conn.recv_bytes_into(memoryview(buf).cast("B"))
                else:
                    conn.recv_bytes()
                flat.append(buf)
            msg = ("add", msg[1], [tuple(flat[i : i + 4]) for i in range(0, len(flat), 4)])
            kind = "add"
        if kind in ("add", "skip"):
            if error is None:
                try:
                    write_item(writer, data_fp, msg)
                except BaseException as e:
                    error = (e, traceback.format_exc())
                    conn.send(("error", _picklable(e), error[1]))
            continue
        try:
            if kind == "close" and error is None:
                conn.send(("closed", writer.close(), writer.stats))
            else:  # abort, or close after an error: keep what was added (resumable), report the outcome
                if writer is not None:
                    writer.commit()
                    writer.release()  # the parent may reopen the shard before this process has exited
                conn.send(("aborted", None, writer.stats if writer is not None else {}))
        except BaseException as e:
            if writer is not None:
                try:
                    writer.release()
                except BaseException:  # noqa: BLE001 - the original error is what matters
                    pass
            conn.send(("error", _picklable(e), traceback.format_exc()))
        return


def _picklable(e: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


class ProcessSink:
    """The shard writer in a child process (spawned: safe after CUDA initialisation); batches travel through a
    pipe from a sender thread, so the device loop neither waits for encoding nor holds the GIL for it.

    The parent must not write to the shard itself while this sink is open."""

    mode = "process"

    def __init__(self, writer_kwargs: Mapping[str, Any], data_fp: str, depth: int = 4):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_writer_process, args=(child, os.getpid(), dict(writer_kwargs), data_fp),
                                 name="cdm-store-writer", daemon=True)
        self._proc.start()
        child.close()
        try:  # wait until the child has opened the shard: open errors surface here, and timing starts warm
            msg = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            code = self._proc.exitcode
            hint = ("; it is spawned, so a script that calls cdm.precompute.run must do so under "
                    "`if __name__ == '__main__':` (or use --writer thread)") if code == 1 else ""
            raise RuntimeError(f"the store writer process died on start (exit code {code}){hint}") from None
        if msg[0] == "error":
            self._proc.join(60)
            err = msg[1]
            err.__notes__ = [f"in the store writer process:\n{msg[2]}"]
            raise err
        self._error: BaseException | None = None
        self._q = ThreadQueue(self._send, depth=depth, name="cdm-store-sender")

    def _check(self) -> None:
        """Pick up an error the child reported (without waiting); only the sender thread reads the pipe here."""
        while self._error is None and self._conn.poll():
            msg = self._conn.recv()
            if msg[0] == "error":
                self._error = msg[1]
                self._error.__notes__ = [f"in the store writer process:\n{msg[2]}"]  # type: ignore[union-attr]
        if self._error is not None:
            raise self._error

    def _died(self) -> RuntimeError:
        self._proc.join(5)
        return RuntimeError(f"the store writer process (pid {self._proc.pid}) died with exit code "
                            f"{self._proc.exitcode}; what it committed is kept: rerun the same command to resume")

    def _send(self, item: tuple[Any, ...]) -> None:
        try:
            self._send_item(item)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            raise self._died() from None

    def _send_item(self, item: tuple[Any, ...]) -> None:
        self._check()
        if item[0] != "add":
            self._conn.send(item)
            return
        # header (pickled, small), then each top-k array as raw bytes straight from its buffer: no pickle copy,
        # and the GIL is released while the bytes go through the pipe
        arrays = [np.ascontiguousarray(a) for r in as_numpy(item[2]) for a in r]
        self._conn.send(("add-raw", item[1], [(a.shape, a.dtype.str) for a in arrays]))
        for a in arrays:
            self._conn.send_bytes(memoryview(a).cast("B"))

    def put(self, item: tuple[Any, ...]) -> None:
        self._q.put(item)

    @property
    def blocked_s(self) -> float:
        """Seconds put() waited because the writer (sender + child) was behind."""
        return self._q.blocked_s

    def _finish(self, kind: str) -> tuple[Any, dict[str, Any]]:
        try:
            self._conn.send((kind,))
        except (BrokenPipeError, ConnectionResetError):
            raise self._died() from None
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, ConnectionResetError):
                if self._error is not None:
                    raise self._error from None
                raise self._died() from None
            if msg[0] == "error":
                err = msg[1]
                err.__notes__ = [f"in the store writer process:\n{msg[2]}"]
                self._error = self._error or err
                continue
            self._conn.close()  # the child has finished the shard and exits on its own: reap it without waiting
            threading.Thread(target=self._proc.join, name="cdm-store-writer-reaper", daemon=True).start()
            return msg[1], msg[2]

    def close(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Drain, finish the shard in the child; (manifest, writer stats). Re-raises the child's first error
        (after the child has committed what it could, so a rerun resumes)."""
        try:
            self._q.close()
        except BaseException:
            self._finish("abort")
            raise
        if self._error is not None:
            self._finish("abort")
            raise self._error
        manifest, stats = self._finish("close")
        if self._error is not None:
            raise self._error
        return manifest, stats

    def abort(self) -> None:
        try:
            self._q.close()
        except BaseException:
            pass
        try:
            self._finish("abort")
        except BaseException:
            pass
