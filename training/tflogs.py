"""Quiet TensorFlow start-up: no absl/oneDNN/CUDA-stub lines on stderr unless asked for.

TensorFlow's native code logs at import and at device set-up ("All log messages before
absl::InitializeLog() ...", "cudart_stub.cc: Could not find cuda drivers", "failed call to
cuInit", oneDNN notices) straight to file descriptor 2, before any Python logging exists and
whatever TF_CPP_MIN_LOG_LEVEL says about some of them. :func:`install` adds an import hook:
the first ``import tensorflow`` (wherever it happens) runs with descriptor 2 pointed at
/dev/null, the devices are listed inside the same window (where the CUDA probe logs), and
stderr is restored. Python errors raised by the import still propagate and are shown.

``DRPIPE_TF_LOGS=1`` turns this off and shows TensorFlow's own logging.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

ENV = "DRPIPE_TF_LOGS"


class _Silence:
    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with _Silence():
            self.loader.exec_module(module)
            try:  # the CUDA probe logs here, on first use: do it inside the window
                module.config.list_physical_devices()
            except Exception:  # noqa: BLE001 - an odd build: its logs are just not hidden
                pass


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps tensorflow's loader. It stays installed until the import: a mere
    ``importlib.util.find_spec("tensorflow")`` (is the training stack installed?) must not
    use it up, or the real import later would go unsilenced."""

    busy = False

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or self.busy or "tensorflow" in sys.modules:
            return None
        from importlib.util import find_spec

        self.busy = True  # let the real finders find it
        try:
            spec = find_spec(name)
        finally:
            self.busy = False
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Hide TensorFlow's native start-up logging in this process (not if DRPIPE_TF_LOGS)."""
    if os.environ.get(ENV, "").strip() not in ("", "0"):
        return
    # 3: not even C++ ERROR lines (the CUDA probe's "failed call to cuInit" on a CPU machine,
    # which also triggers absl's "before InitializeLog" warning); real failures still raise.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # read by TF's C++ at import
    if "tensorflow" not in sys.modules and not any(isinstance(f, _Finder)
                                                   for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
