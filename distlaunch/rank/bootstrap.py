"""Run a user's Python script the way ``python script.py`` would, plus a few things.

``python -m distlaunch.rank.bootstrap SCRIPT [ARGS...]`` is what the worker shim starts
for ``.py`` scripts, and ``... bootstrap -c CODE [ARGS...]`` or ``-m MODULE [ARGS...]``
for ``python -c`` and ``python -m`` ranks of the launcher's own Python (``run``,
``run_code`` and ``run_module``, which a worker's fork calls directly):

- an uncaught exception is printed as usual, recorded (type, message, traceback) in the
  JSON file named by ``DISTLAUNCH_EXCEPTION_FILE``, and the process then leaves at once
  with ``os._exit`` (1; 130 after Ctrl-C): no atexit handler (an MPI finalize, a
  process-group teardown) can hang it while the other ranks wait in a collective, so
  mpirun ends the job promptly; what the program wrote to regular files it left open
  is flushed first, as the interpreter's exit would have, waiting ``FLUSH_WAIT_S`` at
  most (``_flush_files``);
- ``faulthandler`` dumps every thread's stack to stderr on ``DISTLAUNCH_DUMP_SIGNAL``
  (SIGRTMIN+4 unless set), which the launcher sends when ``--hang-timeout`` expires;
- it is started with ``python -P`` (the current directory is not searched for its own
  imports) and puts the script's directory first on ``sys.path``, as plain python does;
- ``sys.exit(N)`` with N != 0 also leaves at once, for the same reason; exit 0 is normal;
- a program that ended well leaves through the interpreter's own exit (its threads
  joined, its atexit handlers run, its modules torn down, MPI finalized), and where the
  collector's last passes would finalize nothing, without them: after the program's own
  atexit handlers, if no live object's type has a finalizer (``__del__``, its own or
  inherited: a gzip file's close, a generator's ``finally``) but plain files, sockets and
  generators that close quietly (``_would_finalize``), the regular files left open are
  flushed as above and every object is frozen (``gc.freeze``), so the exit does not walk
  them again; otherwise (or where no thread can be started for the flush, or a file is
  left open for writing on a pipe or a device, which only Python's exit flushes)
  nothing is frozen. With torch loaded those passes took about 0.24 s of every rank's exit
  (170,000 objects; one full collection takes 65 ms). What still differs from python's
  own exit, which Python does not promise either: the weakref callbacks
  of an object in a reference cycle at exit, the deallocation of a C type's object held
  only from one (an sqlite3 connection before Python 3.12 leaves its ``-wal`` file), and
  the ResourceWarnings of the files and sockets among them, do not happen. Where it
  froze them, and every library mapped is known to lose nothing by it, the process
  then ends as soon as Python's exit is over, without the native libraries' exit
  handlers (``_end_at_native_exit``: 70-80 ms with torch loaded). Where, on top of
  that, its last atexit handler is the bootstrap's (none was registered before the
  program ran: no ``sitecustomize``'s, no coverage's) and no other thread may still run
  Python code, it ends right in that handler, without the rest of Python's exit
  (``_end_now``): the standard streams are flushed as Python's exit flushes them, MPI
  that mpi4py would finalize is finalized (as late as Python's exit would, but with
  every module still there), C's streams are flushed, and then ``os._exit``. A file
  left open for writing on a pipe or a device, which only Python's exit would flush,
  keeps the whole exit. Nothing is frozen then, and the modules are not torn down
  (about 15 ms with torch and ``distlaunch.hvd`` loaded): what else differs is that the
  weakref callbacks and C deallocations of the objects the modules still hold do not
  happen either, as for those in a cycle above. Before any MPI is finalized, Nagle's
  algorithm goes off on the rank's connection to its PMIx server (``pmixlink``: 40 ms
  of Open MPI 5's finalize). ``DISTLAUNCH_FULL_EXIT=1`` (read when the rank starts)
  keeps them all;
- nothing else: ``sys.argv``, ``sys.path[0]`` and ``__main__`` look as they would.
"""
from __future__ import annotations

import _thread
import atexit
import builtins
import faulthandler
import gc
import io
import itertools
import marshal
import os
import runpy
import stat
import sys
import time
import types
import weakref
import zipimport
from collections.abc import Callable, Iterator
from importlib.machinery import BuiltinImporter, SourceFileLoader, SourcelessFileLoader
from importlib.util import MAGIC_NUMBER

from ..protocol import EXCEPTION_FILE, FULL_EXIT, dump_signal

# the interpreter's own path, before the script's folder goes first: without -P (before
# Python 3.11) its first entry is the working directory, which _first_on_path replaces
_START_PATH = sys.path[:] if getattr(sys.flags, "safe_path", False) else sys.path[1:]
_start_new_thread, _allocate_lock = _thread.start_new_thread, _thread.allocate_lock  # as started, not patched
FLUSH_WAIT_S = 5.0  # how long a failing rank waits at most for its open files to be flushed
_RUNS_LAST = False  # whether _at_exit was the first atexit handler registered (so it runs last)
_FLUSH_THREADS: set[int] = set()  # the flush threads that are done (ending, if not gone yet)
_MAIN_THREAD = _thread.get_ident()  # the thread that runs the program, and then the interpreter's exit


def _stdlib(name: str) -> types.ModuleType:
    """Module ``name``: the one loaded already, else the standard library's, not a file of
    the script's folder (which ``_first_on_path`` put first) or of ``PYTHONPATH``. For the
    modules that only a failing script needs, imported then (traceback with linecache and
    tokenize is ~2.5 ms of every rank's start)."""
    loaded = sys.modules.get(name)
    if loaded is not None:
        return loaded
    path = sys.path[:]
    sys.path[:] = [os.path.dirname(os.__file__), *_START_PATH]
    try:
        return __import__(name)
    finally:
        sys.path[:] = path


def _report(exc: BaseException) -> None:
    """Print ``exc`` with its traceback as python does, and record it; where the traceback
    module cannot print it, the interpreter's own printer says what happened."""
    traceback = None
    try:
        traceback = _stdlib("traceback")
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    except BaseException:  # noqa: BLE001 - no traceback module, a second Ctrl-C while printing: still seen
        sys.__excepthook__(type(exc), exc, exc.__traceback__)
    if traceback is not None:
        _record_exception(exc, traceback)


def _record_exception(exc: BaseException, traceback: types.ModuleType) -> None:
    path = os.environ.get(EXCEPTION_FILE)
    if not path:
        return
    json = _stdlib("json")
    data = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
        "message": str(exc)[:4000],
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-20000:],
        "time": time.time(),
    }
    try:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)
    except OSError:
        pass


def _user_frames(exc: BaseException) -> BaseException:
    """Drop the bootstrap's and runpy's frames so the traceback reads like plain python's."""
    tb = exc.__traceback__
    while tb is not None and (tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__)
                              or tb.tb_frame.f_code.co_filename == "<frozen runpy>"):
        tb = tb.tb_next
    return exc.with_traceback(tb)  # None: a script that did not compile shows no frame, as with python


def _flush_files(objects: list[object] | None = None, census: _Census | None = None) -> bool:
    """Flush the files the program left open for writing, as the interpreter's exit
    would have by closing them (``os._exit`` skips it; a crashing program's own log
    would end before its last lines).

    - Regular files only: a pipe or socket whose reader is gone or slow could block.
    - In a thread of its own, waited for ``FLUSH_WAIT_S`` at most: a file whose lock
      another thread holds and never gives back (one that was writing to it when the
      program forked, or a daemon thread stuck in a write) would block the flush for
      ever; the rank leaves all the same. The thread holds the files by weak reference
      only, so a file it never got to is still closed by the exit, as it would have been.
      Started by ``_thread``'s own functions, bound when the bootstrap was imported: a
      ``threading`` the program shadowed or patched (gevent) cannot stand in for them.
      Where no thread can be started (Python 3.12 in an atexit handler) it raises.
    - Found through the collector, which tracks every file object (about 14 ms with
      torch loaded; 2 ms where the standard streams are the only ones, counted by type),
      after ``gc.unfreeze`` so that the files of a program that froze its objects
      (``gc.freeze``) are found too; by type alone, so no object's own ``__class__`` is
      asked (some warn or raise).
    - Text files first: theirs flushes into the binary file below it.
    - Not the standard streams, which are flushed on their own.
    - ``objects``: what ``gc.get_objects()`` gave a caller that unfroze them already;
      ``census``: their types (``_census``), where the caller has them (one pass over
      170,000 objects reads each object's header: ~10 ms, not worth doing twice).

    Whether a file is left that only Python's exit would flush: open for writing on a
    pipe, a terminal or a device but ``/dev/null`` (``/dev/stdout``), or not told in time."""
    if objects is None:
        gc.unfreeze()
        objects = gc.get_objects()
    if census is None:
        census = _census(objects)
    writers = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom)
    files = {key for key, kind in census.distinct.items() if issubclass(kind, writers)}
    standard = _standard_streams()
    streams = {id(stream) for stream in standard}
    listed = {id(stream) for stream in standard if id(type(stream)) in files and gc.is_tracked(stream)}
    if census.count(files) == len(listed):  # those files are the standard streams (tracked: listed)
        return False
    found = [weakref.ref(obj) for obj in itertools.compress(objects, census.chosen(files)) if id(obj) not in streams]
    del objects, census
    if not found:
        return False
    found.sort(key=lambda ref: not issubclass(type(ref()), io.TextIOWrapper))
    done = _allocate_lock()
    done.acquire()
    left: list[bool] = []
    ident = _start_new_thread(_flush_each, (found, done, left))
    if not done.acquire(timeout=FLUSH_WAIT_S):
        return True
    _FLUSH_THREADS.add(ident)  # done: it only returns now
    return bool(left)


# io types whose objects lose nothing where the collector's last passes skip them: text
# and buffered writers are flushed first (_flush_files); readers, raw and in-memory
# files have nothing left to write. Exact types: a subclass may close with a purpose.
_NOTHING_TO_FINALIZE = frozenset({io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom, io.BufferedReader,
                                  io.FileIO, io.BytesIO, io.StringIO})
_TYPE_MRO = type.__dict__["__mro__"].__get__  # type's own accessors: no metaclass of the program's is asked
_TYPE_DICT = type.__dict__["__dict__"].__get__


def _has_finalizer(kind: type) -> bool:
    """Whether objects of ``kind`` run code when freed (``__del__``, its own or inherited:
    io's close, a generator's ``finally``); where that cannot be told, they do."""
    try:
        return any("__del__" in _TYPE_DICT(base) for base in _TYPE_MRO(kind) if base is not object)
    except Exception:  # noqa: BLE001 - the safe answer
        return True


def _closes_quietly(generator: types.GeneratorType) -> bool:
    """Whether closing ``generator`` runs nothing: finished, not started, or suspended in
    code with no handler (no ``try``/``with``; a plain ``yield`` loop such as a sampler's
    ``__iter__``) and not delegating (``yield from``). Told exactly on Python 3.11 only:
    3.12+ gives every generator a handler of its own, and before 3.11 the code's handlers
    cannot be read, so a suspended generator counts as running something there."""
    frame = generator.gi_frame
    if frame is None:
        return True
    suspended = getattr(generator, "gi_suspended", None)
    if suspended is None:  # before Python 3.11
        suspended = frame.f_lasti != -1
    if not suspended:
        return True
    return (sys.version_info[:2] == (3, 11) and generator.gi_yieldfrom is None
            and not generator.gi_code.co_exceptiontable)


def _would_finalize(objects: list[object], census: _Census | None = None) -> bool:
    """Whether the collector's last passes could run code among ``objects``: an object
    whose type has a finalizer (``_has_finalizer``), but for the plain files of
    ``_NOTHING_TO_FINALIZE``, sockets (the process's end closes them all the same) and
    generators that close quietly (``_closes_quietly``); any coroutine or asynchronous
    generator counts (one never awaited warns). By type first: a few hundred types for
    hundreds of thousands of objects. ``census``: the objects' types (``_census``), where
    the caller has them."""
    if census is None:
        census = _census(objects)
    distinct = census.distinct
    plain = {id(kind) for kind in _NOTHING_TO_FINALIZE}
    socket = sys.modules.get("socket")
    if socket is not None:
        plain.add(id(getattr(socket, "socket", None)))
    generator = id(types.GeneratorType)
    if any(key not in plain and key != generator and _has_finalizer(kind) for key, kind in distinct.items()):
        return True
    if generator not in distinct:
        return False
    generators = itertools.compress(objects, census.chosen({generator}))
    return not all(map(_closes_quietly, generators))


class _Census:
    """The types of the live objects, in their order (``kinds``), and the distinct ones by
    id (``distinct``). Hashed and compared directly where no metaclass among theirs
    defines ``__eq__`` or ``__hash__`` of its own (then a type may not hash at all, or run
    the program's code to), which is nearly always so (~7 ms for 170,000 objects);
    otherwise by id (~20 ms)."""

    __slots__ = ("kinds", "distinct", "hashable")

    def __init__(self, kinds: list[type]) -> None:
        self.kinds = kinds
        metaclasses = set(map(type, kinds))  # hashed by their own metaclass: type's, by identity
        self.hashable = not any(map(_hashes_its_own_way, metaclasses))
        if self.hashable:
            self.distinct = {id(kind): kind for kind in set(kinds)}
        else:
            self.distinct = dict(zip(map(id, kinds), kinds))

    def count(self, keys: set[int]) -> int:
        """How many objects have one of the types of ``keys`` (ids in ``distinct``)."""
        if self.hashable:  # one pass in C per type (~2 ms), types compared by identity
            return sum(self.kinds.count(self.distinct[key]) for key in keys if key in self.distinct)
        return sum(self.chosen(keys))

    def chosen(self, keys: set[int]) -> Iterator[bool]:
        """For each object, whether its type is one of ``keys`` (ids in ``distinct``)."""
        if self.hashable:
            return map({self.distinct[key] for key in keys if key in self.distinct}.__contains__, self.kinds)
        return map(keys.__contains__, map(id, self.kinds))


def _census(objects: list[object]) -> _Census:
    """The census of ``objects``: one pass over every object's header."""
    return _Census(list(map(type, objects)))


def _hashes_its_own_way(metaclass: type) -> bool:
    """Whether the classes of ``metaclass`` hash or compare by code of their own (read
    through ``type``'s accessors: the metaclass is not asked)."""
    try:
        return any("__eq__" in _TYPE_DICT(base) or "__hash__" in _TYPE_DICT(base)
                   for base in _TYPE_MRO(metaclass) if base is not type and base is not object)
    except Exception:  # noqa: BLE001 - the safe answer
        return True


def _nothing_to_finalize() -> bool:
    """In the rank's last atexit handler where its program ended well (registered before
    the program ran, so it runs after the program's own): whether the collector's last
    passes and the modules' teardown would finalize nothing (``_would_finalize``), and if
    so, flush the files still open. False also where the files cannot be flushed so (no
    thread to be had, a file open for writing on a pipe or a device): the interpreter's
    whole exit then."""
    objects = census = None
    try:
        gc.unfreeze()
        objects = gc.get_objects()
        census = _census(objects)
        if _would_finalize(objects, census) or _flush_files(objects, census):
            return False
    except Exception:  # noqa: BLE001 - no thread, no memory: the exit as python's own
        return False
    finally:
        objects = census = None
    return True


# shared libraries whose exit handlers (C atexit, C++ static destructors) only free memory
# or undo their own registrations, so that a process loses nothing where they do not run:
# the C and C++ runtimes, compression and crypto, Python's own, Open MPI's (where MPI is
# finalized before: ``_mpi_left_to_native_exit``), by name (what comes before ".so", less
# a "-1.2" version or "-1a2b3c4d" wheel hash)...
_QUIET_LIBRARIES = frozenset({
    "libc", "libm", "libdl", "libpthread", "librt", "libutil", "libresolv", "libanl", "libcrypt", "libnsl",
    "libgcc_s", "libstdc++", "libatomic", "libgomp", "libquadmath", "libz", "libbz2", "liblzma", "libzstd",
    "liblz4", "libffi", "libuuid", "libcrypto", "libssl", "libexpat", "libmpdec", "libsqlite3", "libreadline",
    "libncursesw", "libncurses", "libtinfo", "libedit", "libnuma", "libudev", "libcap", "libgdbm",
    "libgdbm_compat", "libmpi", "libopen-pal", "libopen-rte", "libprrte", "libpmix", "libhwloc", "libfabric",
    "libevent", "libevent_core", "libevent_pthreads", "libucm", "libucp", "libucs", "libuct", "libmpi_cxx",
    "libmpi_mpifh", "libmpi_usempif08", "libibverbs", "librdmacm", "libmlx4", "libmlx5", "libefa", "libverbs",
    "libnl", "libnl-route", "ld",
})
_QUIET_PREFIXES = ("ld-linux", "libpython", "libnss_", "mca_", "libmca_", "libuct_")
# ... and those under these packages' folders (and the ".libs" folder beside each, where
# a wheel keeps the libraries it bundles): where one of them would lose something, it
# is Python's exit (already run) that saves it, not a C handler...
_QUIET_PACKAGES = ("torch", "numpy", "mpi4py", "horovod", "psutil")
# ... but for those told to write something out at exit: UCX its statistics or profile,
# torch its vitals (a static destructor prints them)
_LOUD_SETTINGS = {"UCX_STATS_DEST": ("libuc",), "UCX_STATS_TRIGGER": ("libuc",), "UCX_PROFILE_MODE": ("libuc",),
                  "TORCH_VITAL": ("libtorch", "libc10")}


def _library_name(path: str) -> str:
    """What comes before ".so" in ``path``'s file name, less a "-1.2" version suffix or an
    "-1a2b3c4d" hash (a wheel's bundled copy): ``libevent_core-2.1.so.7`` → ``libevent_core``."""
    name = os.path.basename(path).split(".so", 1)[0]
    stem, dash, tail = name.rpartition("-")
    hashed = len(tail) == 8 and all(c in "0123456789abcdef" for c in tail)
    if dash and stem and tail and (tail[0].isdigit() or hashed):
        return stem
    return name


def _loud_libraries(paths: list[str]) -> list[str]:
    """Those of ``paths`` (the files mapped executable in this process, less its program)
    not known to lose nothing where their exit handlers do not run (see
    ``_QUIET_LIBRARIES``): anything else, say HDF5 closing the files left open, a
    profiler writing its data out, or code with no file of its own (``memfd:``, deleted)."""
    folders = [os.path.join(os.path.dirname(os.__file__), "lib-dynload")]  # the standard library's extensions
    for package in _QUIET_PACKAGES:
        where = getattr(sys.modules.get(package), "__file__", None)
        if where:
            root = os.path.dirname(where)
            folders += [root, root + ".libs"]
    within = tuple({os.path.join(os.path.realpath(folder), "") for folder in folders})  # as the maps name them
    told = tuple(prefix for setting, prefixes in _LOUD_SETTINGS.items() if os.environ.get(setting)
                 for prefix in prefixes)
    loud = []
    for path in paths:
        name = _library_name(path)
        quiet = (path.startswith("/") and not path.startswith("/memfd:") and not path.endswith(" (deleted)")
                 and (name in _QUIET_LIBRARIES or name.startswith(_QUIET_PREFIXES) or path.startswith(within)))
        if not quiet or (told and name.startswith(told)):
            loud.append(path)
    return loud


def _mapped_libraries() -> list[str]:
    """The files mapped executable into this process (``/proc/self/maps``), by path, but
    its program's own: the shared libraries, and anything else that brought code."""
    program = os.path.realpath("/proc/self/exe")
    with open("/proc/self/maps", "rb") as maps:
        fields = (line.split(None, 5) for line in maps.read().decode("utf-8", "replace").splitlines())
        return sorted({field[5] for field in fields
                       if len(field) == 6 and "x" in field[1] and not field[5].startswith("[") and field[5] != program})


def _mpi_active(paths: list[str]) -> bool | None:
    """Whether an MPI library among ``paths`` (``libmpi``, ``libmpich``) is initialized and
    not finalized; None where one's state cannot be read."""
    active = False
    for path in paths:
        if _library_name(path) not in ("libmpi", "libmpich"):
            continue
        try:
            import ctypes

            mpi = ctypes.CDLL(path)
            initialized, finalized = ctypes.c_int(0), ctypes.c_int(0)
            if mpi.MPI_Initialized(ctypes.byref(initialized)) != 0 or \
                    mpi.MPI_Finalized(ctypes.byref(finalized)) != 0:
                return None
        except (ImportError, OSError, AttributeError):
            return None
        active = active or (bool(initialized.value) and not finalized.value)
    return active


def _mpi_left_to_native_exit(paths: list[str]) -> bool:
    """Whether an MPI library among ``paths`` is initialized and not finalized, and
    Python's exit may not finalize it. mpi4py finalizes (from ``Py_AtExit``, before the
    native exit) only where it initialized MPI itself and its ``finalize`` option is on;
    MPI started by a library's C code is finalized by that library's C exit handler, which
    must then run. Of the quiet libraries, only torch's MPI process group does so (Horovod
    finalizes the MPI it started in its shutdown, an atexit handler that ran before), so
    where torch has one, the native exit runs. Where MPI's state cannot be read, it does too.
    Not told: MPI started by the program's own ``ctypes`` call before it imported mpi4py
    (mpi4py then leaves MPI alone, and no C handler would finalize it either)."""
    active = _mpi_active(paths)
    return active is None or (active and not _mpi4py_finalizes())


def _mpi4py_finalizes() -> bool:
    """Whether mpi4py, loaded, is to finalize the MPI that is active now at Python's exit:
    its ``finalize`` option is on (``None``: as ``initialize``), and torch was not built
    with MPI (its MPI process group would start MPI in C++). Not told: where MPI was
    active before mpi4py's import, mpi4py leaves it to whoever started it, though its
    option says otherwise (the bootstrap's end then finalizes it, where the native exit
    would leave it unfinalized)."""
    if "mpi4py.MPI" not in sys.modules:
        return False
    rc = getattr(sys.modules.get("mpi4py"), "rc", None)
    finalize = getattr(rc, "finalize", None)
    if finalize is None:
        finalize = getattr(rc, "initialize", True)
    if finalize not in (True, "yes"):
        return False
    distributed = sys.modules.get("torch.distributed")  # torch's MPI process group starts MPI in C++
    try:
        return not (distributed is not None and distributed.is_mpi_available())
    except Exception:  # noqa: BLE001 - cannot be told: as if it could
        return False


def _end_at_native_exit(paths: list[str]) -> None:
    """After Python's own exit has run in full (its modules torn down, ``Py_AtExit``'s
    functions such as mpi4py's ``MPI_Finalize`` called), end the process at once with the
    exit status: C's buffered streams are flushed and closed (``fcloseall``), then
    ``_exit``, both from C's exit handlers (``on_exit``, glibc), registered last so run
    first. The libraries' own exit handlers and C++ static destructors are skipped: with
    torch loaded that is 70-80 ms of every rank's exit (its operator registry unregisters
    every kernel). Only where every mapped library is known to lose nothing by it
    (``_loud_libraries``), no MPI is left for a C handler to finalize
    (``_mpi_left_to_native_exit``), on Linux with glibc; a handler the program registered
    itself through ``ctypes`` is skipped too. Both functions are called as ``f(status, arg)``;
    ``_exit`` reads the status and ``fcloseall`` nothing, which the x86-64 and AArch64
    calling conventions make safe."""
    try:
        if _loud_libraries(paths) or _mpi_left_to_native_exit(paths):
            return
        import ctypes

        libc = ctypes.CDLL(None)
        on_exit, close_all, leave = libc.on_exit, libc.fcloseall, libc._exit
        if on_exit(ctypes.cast(leave, ctypes.c_void_p), None) == 0 and \
                on_exit(ctypes.cast(close_all, ctypes.c_void_p), None) != 0:
            libc.fflush(None)  # no room for the second: what is buffered now is out at least
    except Exception:  # noqa: BLE001, S110 - no /proc, no glibc, no ctypes: the native exit as usual
        pass


def _is_closed(stream: object) -> bool:
    """A stream's ``closed``, read as Python's exit reads it: open where it cannot be told."""
    try:
        return bool(stream.closed)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - no such attribute (a tee of the program's), or it raised
        return False


def _std_streams_flushed() -> int:
    """Flush the standard streams as the interpreter's exit does: ``sys.stdout`` (a
    failure reported as an exception ignored) and ``sys.stderr``, where not closed; the
    originals (``sys.__stdout__``, ``sys.__stderr__``) too where the program replaced
    them, as the exit's teardown closes them. The exit status Python then gives: 120
    where ``sys.stdout`` or ``sys.stderr`` could not be flushed, else 0."""
    status = 0
    for stream, report in ((sys.stdout, True), (sys.stderr, False)):
        if stream is None or _is_closed(stream):
            continue
        try:
            stream.flush()
        except BaseException as exc:  # noqa: BLE001 - python's exit says 120 too
            status = 120
            if report:
                try:  # as Python reports it (its hook's argument type cannot be made from Python)
                    said = "".join(_stdlib("traceback").format_exception_only(type(exc), exc))
                    sys.stderr.write(f"Exception ignored in: {stream!r}\n{said}")
                    sys.stderr.flush()
                except BaseException:  # noqa: BLE001, S110 - nothing left to report it on
                    pass
    for original in (sys.__stdout__, sys.__stderr__):
        if original is not None and original is not sys.stdout and original is not sys.stderr \
                and not _is_closed(original):
            try:
                original.flush()
            except BaseException:  # noqa: BLE001, S110 - as the teardown's close: ignored
                pass
    return status


def _end_now(paths: list[str]) -> None:
    """End the process here, in the last atexit handler, where the rest of Python's exit
    would only free what the process's end frees anyway (see the module's docstring):
    the bootstrap's handler runs last (``_RUNS_LAST``), every library mapped (``paths``)
    is known to lose nothing (checked by the caller), no MPI is left active but one
    that mpi4py would finalize at Python's exit, which is finalized here instead (a rank
    that never finalizes is a failed job to mpirun), and no other thread Python started
    is alive (but a flush thread that is done), nor any runs Python code. Python's and
    C's streams are flushed, and ``os._exit`` gives the status Python's exit would.
    Returns where it may not end the process so, MPI's state cannot be read, or
    finalizing it failed."""
    if not _RUNS_LAST or _thread._count() > len(_FLUSH_THREADS) or \
            set(sys._current_frames()) - _FLUSH_THREADS != {_thread.get_ident()}:
        return  # another thread may still run Python code: its writes, its MPI calls, until Python's exit
    try:
        import ctypes

        flush_c_streams = ctypes.CDLL(None).fflush
        active = _mpi_active(paths)
        if active is None or (active and not _mpi4py_finalizes()):
            return
    except Exception:  # noqa: BLE001 - no ctypes, no glibc: Python's exit then
        return
    status = _std_streams_flushed()  # before MPI's finalize, as Python's exit
    if active:
        try:
            sys.modules["mpi4py.MPI"].Finalize()
            if _mpi_active(paths) is not False:
                return
        except Exception:  # noqa: BLE001 - MPI's own error: Python's exit then
            return
    flush_c_streams(None)
    os._exit(status)


def _pmix_without_nagle(paths: list[str]) -> None:
    """Where MPI is active (or its state cannot be read), so that a finalize is still to
    come (here or in Python's exit), switch Nagle's algorithm off on the rank's
    connection to its PMIx server: Open MPI's finalize then takes 1-6 ms, not 40-50
    (``pmixlink``)."""
    try:
        if _mpi_active(paths) is not False:
            from . import pmixlink

            pmixlink.nodelay()
    except Exception:  # noqa: BLE001, S110 - an option left as it was: a slower finalize, nothing else
        pass


def _at_exit() -> None:
    """The rank's last atexit handler where its program ended well. The finalize of an
    MPI still active is made quicker (``_pmix_without_nagle``). Where nothing would
    be finalized (``_nothing_to_finalize``, which flushes the open files): if every
    library mapped is known to lose nothing without its exit handlers, the process ends
    here where it may (``_end_now``); otherwise every object is frozen for the
    collector's last passes, and the libraries' native exit handlers are skipped where
    they may (``_end_at_native_exit``). The collector is off meanwhile: a collection set
    off by what this handler allocates (reading the process's maps, importing ctypes)
    would finalize some of what the freeze or the end keeps from it. Called by the
    program itself (``atexit._run_exitfuncs()``), it does nothing."""
    if sys._getframe().f_back is not None or _thread.get_ident() != _MAIN_THREAD:
        return  # called by the program (atexit._run_exitfuncs), in any thread: not the exit
    collecting = gc.isenabled()
    gc.disable()
    try:
        try:
            paths = _mapped_libraries()
            quiet = not _loud_libraries(paths)
        except Exception:  # noqa: BLE001 - no /proc: the native exit as usual
            paths, quiet = [], False
        _pmix_without_nagle(paths)
        if not _nothing_to_finalize():
            return
        if quiet:
            _end_now(paths)
        gc.freeze()
        if quiet:
            _end_at_native_exit(paths)
    finally:
        if collecting:
            gc.enable()


def _standard_streams() -> list[object]:
    """sys's standard streams (and the originals), with the binary files below them."""
    found: list[object] = []
    for stream in (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__):
        if stream is None:
            continue
        found.append(stream)
        if issubclass(type(stream), io.TextIOWrapper):
            try:  # io's own accessor: a subclass's property of that name is not asked
                found.append(io.TextIOWrapper.buffer.__get__(stream))
            except Exception:  # noqa: BLE001, S112 - detached: nothing below it to leave out
                continue
    return found


def _is_null(status: os.stat_result) -> bool:
    """Whether ``status`` is ``/dev/null``'s (a write there never blocks)."""
    if not stat.S_ISCHR(status.st_mode):
        return False
    try:
        null = os.stat(os.devnull)
    except OSError:
        return False
    return stat.S_ISCHR(null.st_mode) and null.st_rdev == status.st_rdev


def _flush_each(handles: list[weakref.ref[io.IOBase]], done: _thread.LockType, left: list[bool]) -> None:
    """In the flush thread: flush each of ``handles`` (still there) that is open for
    writing on a regular file or ``/dev/null``, note in ``left`` one open for writing on
    anything else (a pipe, a terminal), then release ``done``."""
    try:
        for ref in handles:
            handle = ref()
            try:
                if handle is not None and not handle.closed and handle.writable():
                    status = os.fstat(handle.fileno())
                    if stat.S_ISREG(status.st_mode) or _is_null(status):
                        handle.flush()
                    else:
                        left.append(True)
            except BaseException:  # noqa: BLE001 - detached, closed meanwhile, a disk full
                continue
            finally:
                handle = None  # held no longer than its own flush
    finally:
        done.release()


def _leave_now(code: int) -> None:
    """Leave the process with exit status ``code`` (see the module's docstring), whatever
    happens before: a signal handler of the program's that raises (``sys.exit(0)`` on
    SIGTERM, as mpirun sends when a peer failed) must not take the rank back into the
    worker's code or to an exit that waits in atexit handlers."""
    status = code if -(1 << 31) <= code < 1 << 31 else 1  # sys.exit(2**40) would overflow os._exit
    try:
        try:
            _flush_files()
        except BaseException:  # noqa: BLE001 - no thread to be had, no memory, a second Ctrl-C
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - a closed or broken stream must not keep the rank alive
                pass
    finally:
        os._exit(status)


def run(argv: list[str]) -> None:
    """Run ``argv`` (SCRIPT [ARGS...]) as ``__main__``, as described above. Returns (or
    raises ``SystemExit`` with code 0 or None) only when the script ended well; a failing
    script leaves the process here and now. Also what a worker's fork runs
    (``distlaunch.rank.worker``), so the rank needs no interpreter of its own."""
    script = os.path.abspath(argv[0])
    sys.argv = list(argv)
    _guarded(lambda: _run_script(script))


def _run_script(path: str) -> None:
    """A .py rank's program, as python runs it: a zipapp's ``__main__.py`` with the
    archive first on ``sys.path``, else the script (``_run_file``) with its folder first
    (the real one, where the script is a link)."""
    if _is_zip(path):
        _first_on_path(path)
        _new_main()
        _as_main()("__main__", False)
    else:
        _first_on_path(os.path.dirname(os.path.realpath(path)))
        _run_file(path)


def _run_file(path: str) -> None:
    """Run the script at ``path`` as ``python SCRIPT`` does: compiled on its own (no
    ``__future__`` flag of this module's; bytecode where the file holds this Python's), in
    a new ``__main__`` module that stays in ``sys.modules`` to the end, with the names
    python gives it. Not ``runpy.run_path``: its namespace is a temporary module's, dropped
    when the script returns; a script that defines a function then holds it in a
    reference cycle, which is freed only by the collector, in no fixed order, so a file
    the script left open could be closed before its text was flushed into it (its last
    writes lost). ``__main__``'s namespace is cleared at the interpreter's exit as a
    script's always is."""
    with io.open_code(path) as handle:  # as python reads a script (audit hooks see it)
        data = handle.read()
    if data[:4] == MAGIC_NUMBER:  # compiled bytecode, whatever its name (python checks the same)
        code, loader = marshal.loads(data[16:]), SourcelessFileLoader("__main__", path)
    else:
        code, loader = compile(data, path, "exec", dont_inherit=True), SourceFileLoader("__main__", path)
    main = _new_main()
    main.__dict__.update(__file__=path, __cached__=None, __loader__=loader)
    exec(code, main.__dict__)


def _is_zip(path: str) -> bool:
    """Whether ``path`` is a zip archive (a zipapp), by the import hook python asks."""
    try:
        zipimport.zipimporter(path)
    except (zipimport.ZipImportError, OSError):
        return False
    return True


def _as_main() -> Callable[[str, bool], object]:
    """What the interpreter runs for ``python -m`` and a zipapp: runpy's, which runs the
    module in the ``__main__`` module there is (``_new_main``'s); ``runpy.run_module``
    where that private function is gone."""
    as_main = getattr(runpy, "_run_module_as_main", None)
    if as_main is None:
        return lambda name, alter_argv: runpy.run_module(name, run_name="__main__", alter_sys=alter_argv)
    return as_main


def run_code(argv: list[str]) -> None:
    """``python -c CODE [ARGS...]``: ``sys.argv`` is ``['-c', ARGS...]``, ``sys.path[0]``
    is ``''`` and the code runs in a new ``__main__`` module, as in a new interpreter;
    otherwise as ``run``."""
    sys.argv = ["-c", *argv[1:]]
    _first_on_path("")
    main = _new_main()
    # dont_inherit: the code gets no __future__ flag of this module's, as with python -c
    _guarded(lambda: exec(compile(argv[0], "<string>", "exec", dont_inherit=True), main.__dict__))


def run_module(argv: list[str]) -> None:
    """``python -m MODULE [ARGS...]``: the current directory first on ``sys.path``, a new
    ``__main__`` module, and ``sys.argv[0]`` the module's file, by the function ``python
    -m`` itself calls; otherwise as ``run``."""
    sys.argv = ["-m", *argv[1:]]
    _first_on_path(os.getcwd())
    _new_main()
    _guarded(lambda: _as_main()(argv[0], True))


def _first_on_path(entry: str) -> None:
    """Put ``entry`` first on ``sys.path``: added under ``-P`` (Python 3.11+, nothing of
    ours there), else in place of the directory that ``-m`` put there."""
    if getattr(sys.flags, "safe_path", False):
        sys.path.insert(0, entry)
    else:
        sys.path[0] = entry


def _new_main() -> types.ModuleType:
    """A ``__main__`` module as a new interpreter has it before running anything."""
    main = types.ModuleType("__main__")
    main.__dict__.update(__builtins__=builtins, __loader__=BuiltinImporter)
    if sys.version_info < (3, 14):
        main.__dict__["__annotations__"] = {}
    sys.modules["__main__"] = main
    return main


def _exit_handlers() -> int | None:
    """How many atexit handlers are registered (inherited from the worker in a fork, a
    ``sitecustomize``'s); None where Python does not tell."""
    try:
        return atexit._ncallbacks()
    except Exception:  # noqa: BLE001 - another Python's atexit: as if there were some
        return None


def _guarded(body: Callable[[], object]) -> None:
    """Run the program's ``body`` with the dump signal armed; return only when it ended
    well, leave the process at once otherwise (see the module's docstring)."""
    global _RUNS_LAST, _MAIN_THREAD
    faulthandler.register(dump_signal(), file=sys.stderr, all_threads=True, chain=False)
    if os.environ.get(FULL_EXIT) != "1":
        _MAIN_THREAD = _thread.get_ident()
        _RUNS_LAST = _exit_handlers() == 0
        atexit.register(_at_exit)
    try:
        body()
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        # a failing exit must not wait in atexit handlers (MPI finalize) for peers that
        # are blocked in a collective: leave now, mpirun then ends the job
        code = 1
        try:
            code = exc.code if isinstance(exc.code, int) else 1
            if not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        finally:
            _leave_now(code)
    except BaseException as exc:  # noqa: BLE001 - every uncaught exception ends the rank
        code = 1
        try:  # whatever happens while reporting it (a second Ctrl-C, say), the rank leaves
            code = 130 if isinstance(exc, KeyboardInterrupt) else 1
            _report(_user_frames(exc))
        finally:
            _leave_now(code)


def main() -> None:
    """``SCRIPT [ARGS...]``, ``-c CODE [ARGS...]`` or ``-m MODULE [ARGS...]``."""
    argv = sys.argv[1:]
    if argv[:1] == ["-c"] and len(argv) > 1:
        run_code(argv[1:])
    elif argv[:1] == ["-m"] and len(argv) > 1:
        run_module(argv[1:])
    elif argv and not argv[0].startswith("-"):
        run(argv)
    else:
        sys.stderr.write("usage: python -m distlaunch.rank.bootstrap SCRIPT|-c CODE|-m MODULE [ARGS...]\n")
        sys.exit(2)


if __name__ == "__main__":
    # run by the module of its own name, not this copy that ``-m`` made ``__main__``: a frame
    # of the bootstrap's (where a warning's stacklevel overshoots the script) must not
    # count as ``__main__``'s, whose DeprecationWarnings python shows
    from distlaunch.rank import bootstrap

    bootstrap.main()
