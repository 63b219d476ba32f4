"""Helper processes for the NumPy backend's passes over sample blocks and layers.

NumPy releases the GIL inside each call, but a step at the medium size makes about
2000 calls of 5–10 µs each, and two threads then hand the GIL to each other at every
call: measured on a 2-core AMD EPYC, two threads running the activation's passes on
their own sample blocks took as long as one thread doing both. Processes share no GIL.
A helper is a Python process (``serve``) that maps the workspace's arrays from one file
in memory (``shared_arrays``) and runs its part of a pass on them when asked (one line
each way per pass, on its stdin and stdout): the same function on the same part as the
main process would run, so that the numbers do not depend on how many processes there are.

A helper runs in its own session (a terminal's Ctrl-C reaches only the main process)
and dies with it (``PR_SET_PDEATHSIG``, and end of its stdin). If a helper fails or
dies, the main process computes its parts itself from then on, with a warning: the
same numbers, on one core (a part the helper may have half done is done again from
its inputs). Not handled: a helper that hangs without dying (the main process waits).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .activations import Activation
from .children import Spec, array_offsets, map_arrays, pdeathsig, popen, shm_dir


def shared_arrays(spec: Spec) -> tuple[dict[str, np.ndarray], int | str]:
    """New zeroed arrays of ``spec`` in a file of their own, and that file: on Linux an anonymous
    one (``memfd_create``: no name in any folder to leave behind, no /dev/shm size limit), passed
    to the helpers by descriptor; elsewhere a file in the temp dir, by path. The caller closes
    or unlinks it once the helpers have mapped it.

    The file's blocks are allocated first: no room is then an OSError here, not a SIGBUS at the
    first write past the end."""
    size = array_offsets(spec)[1]
    if hasattr(os, "memfd_create"):
        fd, source = os.memfd_create("mfres-numpy", os.MFD_CLOEXEC), None
    else:  # pragma: no cover - not Linux
        fd, path = tempfile.mkstemp(prefix=f"mfres-numpy-{os.getpid()}-", suffix=".bin", dir=shm_dir())
        source = path
    try:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)
            else:  # pragma: no cover - macOS
                os.ftruncate(fd, size)
        except OSError as e:
            raise OSError(f"no room for {size / 2**20:.0f} MiB of shared arrays ({e.strerror})") from None
        if source is None:
            return map_arrays(fd, spec), fd
        os.close(fd)
        return map_arrays(source, spec), source
    except BaseException:
        release(fd if source is None else source)
        raise


def release(source: int | str) -> None:
    """Close (a descriptor) or unlink (a path) a file of ``shared_arrays``: the mappings stay."""
    with contextlib.suppress(OSError):
        if isinstance(source, int):
            os.close(source)
        else:
            os.unlink(source)


def _encode(args: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in args.items():
        if isinstance(v, range):
            out[k] = ["range", v.start, v.stop, v.step]
        elif isinstance(v, Activation):
            out[k] = ["activation", v.name, v.eta]
        else:
            out[k] = v
    return out


def _decode(args: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in args.items():
        if isinstance(v, list) and v and v[0] == "range":
            out[k] = range(*v[1:])
        elif isinstance(v, list) and v and v[0] == "activation":
            out[k] = Activation(v[1], float(v[2]))
        else:
            out[k] = v
    return out


class Helpers:
    """``count`` helper processes over the shared arrays of one workspace.

    ``workspace``: the keyword arguments that rebuild the workspace in a helper
    (``model.Workspace`` with ``attach``), ``source``: the file of its arrays (``shared_arrays``).
    """

    def __init__(self, count: int, source: int | str, spec: Spec, workspace: dict[str, Any]) -> None:
        self.procs: list[subprocess.Popen] = []
        self.broken = False
        # the parent's own modules (its sys.path, and this mfres's folder first), BLAS on one thread
        modules = [str(Path(__file__).resolve().parent.parent), *sys.path]
        code = f"import sys; sys.path[:] = {modules!r}; from mfres.parallel import serve; serve()"
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        hello = json.dumps({"source": source, "spec": {k: [list(s), d] for k, (s, d) in spec.items()},
                            "workspace": workspace}) + "\n"
        try:
            for _ in range(count):
                self.procs.append(popen(args=[sys.executable, "-c", code],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                        start_new_session=True, preexec_fn=pdeathsig(), close_fds=True,
                                        pass_fds=(source,) if isinstance(source, int) else ()))
            for p in self.procs:
                p.stdin.write(hello.encode())  # type: ignore[union-attr]
                p.stdin.flush()  # type: ignore[union-attr]
            for p in self.procs:
                line = p.stdout.readline().decode()  # type: ignore[union-attr]
                if line.strip() != "ready":
                    raise OSError(f"a NumPy helper process did not start ({line.strip() or 'no reply'})")
        except BaseException:
            self.close()
            raise
        self._finalizer = weakref.finalize(self, _stop, self.procs)

    def run(self, task: str, n: int, args: dict[str, Any], local: Callable[[int], None],
            redo: Callable[[int], None]) -> None:
        """Part 0 of ``n`` here (``local(0)``), parts 1..n-1 in the helpers, then wait for them.
        A part whose helper failed is done here by ``redo`` (which first restores what the part
        may have half overwritten), and every later part too. A floating-point error that the
        caller's error state raises is raised here, from the part done again."""
        if self.broken:
            for i in range(n):
                local(i)
            return
        req: dict[str, Any] = {"task": task, "n": n, "args": _encode(args), "err": np.geterr()}
        sent: list[int] = []
        try:
            for i in range(1, n):
                req["i"] = i
                self.procs[i - 1].stdin.write((json.dumps(req) + "\n").encode())  # type: ignore[union-attr]
                self.procs[i - 1].stdin.flush()  # type: ignore[union-attr]
                sent.append(i)
        except OSError:
            self._fail("stopped")
        except BaseException:  # interrupted between a request and its record: replies could not be matched
            self._abandon()
            raise
        again: list[int] = [i for i in range(1, n) if i not in sent]
        try:
            local(0)
        finally:
            try:
                for i in sent:
                    reply = self._reply(i - 1)
                    if reply != "ok":
                        again.append(i)
                        if not reply.startswith("error FloatingPointError"):
                            self._fail(reply)
            except BaseException:  # interrupted while waiting: the replies can no longer be matched
                self._abandon()
                raise
        for i in sorted(again):
            redo(i)

    def _abandon(self) -> None:
        self.broken = True
        self.close()

    def _reply(self, k: int) -> str:
        try:
            line = self.procs[k].stdout.readline().decode().strip()  # type: ignore[union-attr]
        except (OSError, ValueError):
            line = ""
        if not line:
            code = self.procs[k].poll()
            return f"exited ({code})" if code is not None else "closed its output"
        return line

    def _fail(self, why: str) -> None:
        if not self.broken:
            warnings.warn(f"a NumPy helper process failed ({why[:300]}); the rest of this run computes its "
                          f"part in the main process (the same numbers, fewer cores)", RuntimeWarning, stacklevel=4)
        self.broken = True

    def close(self) -> None:
        _stop(self.procs)
        self.procs = []


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        with contextlib.suppress(OSError, ValueError):
            p.stdin.close()  # type: ignore[union-attr]  # a helper exits at the end of its input
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        with contextlib.suppress(OSError, ValueError):
            p.stdout.close()  # type: ignore[union-attr]


def serve() -> None:
    """A helper's life: map the arrays, rebuild the workspace, run the parts asked for."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # nothing printed by accident, from Python or C, may reach the protocol
    sys.stdout = sys.stderr
    from . import model

    hello = json.loads(sys.stdin.readline())
    spec = {k: (tuple(s), d) for k, (s, d) in hello["spec"].items()}
    work = model.Workspace(**hello["workspace"], attach=map_arrays(hello["source"], spec))
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            with np.errstate(**req["err"]):
                work.run_part(req["task"], req["i"], req["n"], _decode(req["args"]))
            reply = "ok"
        except Exception as e:  # reported to the main process, which computes the part itself
            reply = f"error {type(e).__name__}: {e}".replace("\n", " | ")
        out.write(reply.encode() + b"\n")
        out.flush()
