"""Build and load the C++/OpenMP CPU kernels of ``cpu/csrc/`` (on first use; never at import).

``extension()`` compiles the sources with ``torch.utils.cpp_extension.load`` (ninja, the C++ compiler
torch finds) the first time a process needs them, caches the module for the process (torch caches the
built library on disk, under ``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``, so later
processes only load it), and is thread-safe: concurrent first calls compile once. When there is no
compiler, no ninja, or the build fails, it returns None (and the reason stays in ``build_error()``);
callers that fall back to the torch path ask for the one warning of the process
(``fallback_warning=True``), a caller that must raise instead (``CALIBRL_IMPL=cpp``) does not.

Prebuild (e.g. in a Docker image) and print where the library is::

    python -m calibrl_kernels.build

The sources ship inside the package (``calibrl_kernels/cpu/csrc``, package data of a wheel or an editable
install alike).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import List, Optional

import torch

try:
    import fcntl
except ImportError:  # not on Windows: builds are then only serialised by torch's own lock file
    fcntl = None

SOURCES = ("cpu_ops.cpp",)
HEADERS = ("cpu_ops.h",)
# Portable flags only: no -march; cpu_ops.h picks AVX2 / AVX-512 code paths at load time.
# -ffp-contract=fast lets those paths use FMA (ISO C++ mode turns contraction off by default).
CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=fast")
LDFLAGS = ("-fopenmp",)  # tuples: cpp_extension.load appends torch's libraries to the list it is given

_lock = threading.Lock()
_module = None
_error: Optional[BaseException] = None
_warned = False  # the fallback warning was given in this process


def extension_name() -> str:
    """A module name per torch build, per content of the sources and flags, and per source folder.

    So a library built for another torch is never loaded, and two checkouts / installed copies that share
    the torch extensions cache get one build folder each instead of rebuilding over each other's library
    (torch's ninja file names the source paths, so even identical sources in two folders would rebuild).
    """
    src = source_dir()
    digest = hashlib.sha256(repr((CFLAGS, LDFLAGS, str(src))).encode())
    for name in SOURCES + HEADERS:
        digest.update((src / name).read_bytes())
    torch_version = re.sub(r"\W", "_", torch.__version__)
    return f"calibrl_cpu_ops_{torch_version}_{digest.hexdigest()[:12]}"


def source_dir() -> Path:
    """The folder holding the C++ sources and headers (``csrc/`` beside this file)."""
    folder = Path(__file__).resolve().parent / "csrc"
    missing = [name for name in SOURCES + HEADERS if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"calibrl_kernels: the C++ sources {missing} are missing from {folder}")
    return folder


def _build_directory(name: str, verbose: bool) -> str:
    """The folder torch builds the extension ``name`` in (under TORCH_EXTENSIONS_DIR or torch's default root)."""
    from torch.utils import cpp_extension

    find = getattr(cpp_extension, "_get_build_directory", None)
    if find is not None:
        return find(name, verbose)
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    return folder


@contextlib.contextmanager
def _build_lock(folder: str):
    """One calibrl build or load at a time per build folder, across processes, that dies with its holder.

    torch guards a build folder with a lock *file* (``lock``) that a process creates before running ninja
    and deletes afterwards, even when nothing is rebuilt. A process killed in between (SIGKILL, a test's
    timeout) leaves the file behind, and every later process then waits for it forever. An ``flock`` is
    released by the kernel when its holder dies, so under it a leftover ``lock`` file can only be stale and
    is removed before torch looks at it.
    """
    with _folder_flock(folder):
        stale = os.path.join(folder, "lock")
        if os.path.exists(stale):
            os.remove(stale)
        yield


@contextlib.contextmanager
def _folder_flock(folder: str):
    """Hold the build folder's flock (none on systems without fcntl)."""
    if fcntl is None:
        yield
        return
    with open(os.path.join(folder, "calibrl.flock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile_and_load(verbose: bool = False):
    """Compile (if the cached build is stale) and import the extension module."""
    from torch.utils import cpp_extension

    src = source_dir()
    name = extension_name()
    folder = _build_directory(name, verbose)
    with _build_lock(folder):
        return cpp_extension.load(
            name=name,
            sources=[str(src / file) for file in SOURCES],  # cpu_ops.h sits beside them (ninja tracks it)
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            build_directory=folder,
            verbose=verbose,
        )


def expected_layout() -> dict:
    """What the extension's layout() must return: the table columns of reference.coefficients."""
    from ..reference import coefficients as coef

    expected = {name: i for i, name in enumerate(coef.TOKEN_FIELDS)}
    expected.update({f"row.{name}": i for i, name in enumerate(coef.ROW_FIELDS)})
    expected.update(token_count=len(coef.TOKEN_FIELDS), row_count=len(coef.ROW_FIELDS))
    return expected


def _check_layout(module) -> None:
    """The C++ table columns must be those of reference.coefficients (a stale or foreign build fails here)."""
    layout = module.layout()
    expected = expected_layout()
    if layout != expected:
        raise RuntimeError(
            f"table layout of the C++ kernels {layout} differs from calibrl_kernels.reference.coefficients {expected}"
        )


def extension(verbose: bool = False, *, fallback_warning: bool = True):
    """The loaded C++ module, building it on first use; None if it cannot be built.

    fallback_warning: on failure, warn (once per process) that the torch path is used instead.
    """
    global _module, _error
    if _module is None and _error is None:
        with _lock:
            if _module is None and _error is None:
                try:
                    module = _compile_and_load(verbose)
                    _check_layout(module)
                    _module = module
                except Exception as error:  # no compiler / ninja, compile error, stale library ...
                    _error = error
    if _module is None and fallback_warning:
        _warn_fallback_once()
    return _module


def _warn_fallback_once() -> None:
    global _warned
    with _lock:
        if _warned:
            return
        _warned = True
    error = _error
    last_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
    warnings.warn(
        f"calibrl_kernels: the C++ CPU kernels could not be built ({type(error).__name__}: {last_line}); "
        "using the torch path. Run `python -m calibrl_kernels.build` to see the full build log.",
        RuntimeWarning,
        stacklevel=4,
    )


def attempted() -> bool:
    """Whether this process already tried to build (successfully or not)."""
    return _module is not None or _error is not None


def build_error() -> Optional[BaseException]:
    """Why the build failed in this process (None when it did not fail or was not tried)."""
    return _error


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-q" not in argv and "--quiet" not in argv
    start = time.perf_counter()
    try:
        module = _compile_and_load(verbose=verbose)
        _check_layout(module)
    except Exception as error:
        print(f"calibrl_kernels: building the C++ CPU kernels failed: {error}", file=sys.stderr)
        return 1
    print(f"calibrl_kernels: C++ CPU kernels ready in {time.perf_counter() - start:.1f} s")
    print(f"  library: {module.__file__}")
    print(f"  sources: {source_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
