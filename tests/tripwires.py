"""Tripwires: what a crafted file would reach for, replaced by functions
that record the call and run nothing.

`armed()` replaces, under every name a loaded module has for them,
`os.system` and its kin, `subprocess`'s runners,
`builtins.exec`/`eval`, NumPy's file-writing functions, and
`importlib.import_module` and `__import__` of a module not yet imported
(importing one already imported runs no code); it yields the list of the
tripwires reached.
"""

import builtins
import contextlib
import encodings.cp437  # noqa: F401 (imported lazily by zipfile's names)
import functools
import importlib
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

WIRED = {
    os: (
        "system",
        "popen",
        "execv",
        "execve",
        "execvp",
        "spawnv",
        "remove",
        "unlink",
        "rmdir",
    ),
    subprocess: (
        "run",
        "Popen",
        "call",
        "check_call",
        "check_output",
        "getoutput",
        "getstatusoutput",
    ),
    builtins: ("exec", "eval"),
    np: ("save", "savez", "savez_compressed", "savetxt"),
    jnp: ("save", "savez"),
}


def originals():
    """The functions the tripwires replace (and `import_module`)."""
    found = [importlib.import_module, builtins.__import__]
    for owner, names in WIRED.items():
        found += [
            getattr(owner, name) for name in names if hasattr(owner, name)
        ]
    return found


@contextlib.contextmanager
def armed():
    reached = []
    saved = []

    def tripwire(name, original):
        # The original's name: loading resolves it as it would the original.
        @functools.wraps(original)
        def wire(*args, **kwargs):
            reached.append(name)
            raise RuntimeError(f"tripwire {name} reached")

        return wire

    wires = {}
    for owner, names in WIRED.items():
        for name in names:
            if hasattr(owner, name):
                original = getattr(owner, name)
                label = f"{owner.__name__}.{name}"
                wires[id(original)] = tripwire(label, original)
    # Every module's name for an original is rewired (`np.lib.npyio.save`
    # is `np.save`; `posix.system` is `os.system`).
    for module in list(sys.modules.values()):
        try:
            namespace = vars(module)
        except TypeError:
            continue
        for key, value in list(namespace.items()):
            wire = wires.get(id(value))
            if wire is not None and value is not wire:
                saved.append((namespace, key, value))
                namespace[key] = wire
    real_import = builtins.__import__
    real_import_module = importlib.import_module

    def guarded_import_module(name, package=None):
        if name not in sys.modules:
            reached.append(f"importlib.import_module({name})")
            raise RuntimeError(f"tripwire import_module({name}) reached")
        return real_import_module(name, package)

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name not in sys.modules:
            reached.append(f"__import__({name})")
            raise RuntimeError(f"tripwire __import__({name}) reached")
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = guarded_import
    importlib.import_module = guarded_import_module
    try:
        yield reached
    finally:
        builtins.__import__ = real_import
        importlib.import_module = real_import_module
        for namespace, key, value in saved:
            namespace[key] = value
