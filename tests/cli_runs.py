"""Many ``ggufllm`` runs that load no model (help, refused options), each in a process of its
own, for the cost of one interpreter start.

One ``python`` imports ``ggufllm.cli`` once, then forks a child per run: the child takes
the run's working folder and environment, its stdin, stdout and stderr become files (so
what native code writes to the descriptors is caught as well as Python's output), and it
runs the command as ``python -m ggufllm.cli`` does; its exit status is the run's. A run
shares nothing with the others but the modules already imported (their import is what a
separate interpreter would redo: ~0.45 s a run on one core).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_DRIVER = r"""
import json, os, sys, tempfile, traceback
from ggufllm.cli import main

results = []
for case in json.load(open(sys.argv[1], encoding="utf-8")):
    files = [tempfile.TemporaryFile() for _ in range(3)]
    files[0].write(case["input"].encode()); files[0].flush(); files[0].seek(0)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, f in enumerate(files):
                os.dup2(f.fileno(), fd)
            os.chdir(case["cwd"])
            for name, value in case["env"].items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            sys.argv = ["ggufllm", *case["args"]]
            try:
                main()
                code = 0
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    out = []
    for f in files[1:]:
        f.seek(0)
        out.append(f.read().decode("utf-8", "replace"))
    results.append({"returncode": os.waitstatus_to_exitcode(status), "stdout": out[0],
                    "stderr": out[1]})
json.dump(results, sys.stdout)
"""


def ggufllm_runs(cases: list[tuple[str, ...]], cwd: Path,
                 env: dict[str, str | None] | None = None,
                 input: str = "") -> list[subprocess.CompletedProcess[str]]:
    """Runs ``ggufllm ARGS`` for each ``ARGS`` of ``cases``, each in a forked process of its
    own, in ``cwd``, with ``env`` over this environment (None: the variable unset) and
    ``input`` on stdin."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", encoding="utf-8") as spec:
        json.dump([{"args": list(args), "cwd": str(cwd), "env": env or {}, "input": input}
                   for args in cases], spec)
        spec.flush()
        done = subprocess.run([sys.executable, "-c", _DRIVER, spec.name], capture_output=True,
                              text=True, timeout=300, stdin=subprocess.DEVNULL,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr
    return [subprocess.CompletedProcess(tuple(args), **r)
            for args, r in zip(cases, json.loads(done.stdout), strict=True)]
