"""The entry point of the PyInstaller bundle: the ``ggufllm`` command, and the interpreter
that ggufllm's own child processes need.

In a frozen application ``sys.executable`` is this program, not Python. ggufllm starts
itself in two forms, and the bundle answers each as ``python`` would:

- ``ggufllm <bundle>/_internal/ggufllm/native/_kernel_child.py ARGS`` (the CPU kernel
  self-test) and ``.../_probe_child.py ARGS`` (the probe load): the script runs as
  ``__main__`` with its folder first on ``sys.path``, as ``python SCRIPT`` runs it;
- ``ggufllm -m ggufllm.cli ARGS`` (``ggufllm bench`` starting its server): the command.

Only those two scripts, at their place inside the bundle, run this way: a user's argument
never becomes code to run. Anything else is the ``ggufllm`` command.
"""

from __future__ import annotations

import os
import runpy
import sys

_CHILD_SCRIPTS = ("_kernel_child.py", "_probe_child.py")


def _bundled_child(argv: list[str]) -> str | None:
    """The child script ``argv[1]`` names, when it is one shipped in this bundle."""
    if len(argv) < 2:
        return None
    folder = os.path.realpath(os.path.join(getattr(sys, "_MEIPASS", ""), "ggufllm", "native"))
    path = os.path.realpath(argv[1])
    if os.path.dirname(path) == folder and os.path.basename(path) in _CHILD_SCRIPTS:
        return path
    return None


def main() -> None:
    child = _bundled_child(sys.argv)
    if child is not None:
        sys.argv = sys.argv[1:]
        sys.path.insert(0, os.path.dirname(child))
        runpy.run_path(child, run_name="__main__")
        return
    if sys.argv[1:3] == ["-m", "ggufllm.cli"]:
        del sys.argv[1:3]
    from ggufllm.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
