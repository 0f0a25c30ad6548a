"""The bundle's executable: ``segstudio`` (the command line and the app) in a PyInstaller one-folder build.

Inside the bundle there is no ``python``, yet segstudio starts helper processes
with ``sys.executable`` the way it would start Python: the confined model
converter (``sys.executable -I -B -m segstudio.core.models.confine JOB``) and
its probe (``-I -S -c CODE``); Dask's worker processes come through
``multiprocessing``.  So when the first argument is an interpreter flag, this
launcher does what ``python`` would do with ``-m MODULE`` or ``-c CODE`` (the
isolation flags ``-I -B -S -E -s`` are accepted: the frozen interpreter
already ignores ``PYTHON*`` variables, user site-packages and the current
folder, and writes no bytecode).  Anything else is segstudio's command line.
"""

from __future__ import annotations

import multiprocessing
import runpy
import sys

ISOLATION_FLAGS = {"-I", "-B", "-S", "-E", "-s", "-u"}


def _as_python(argv: list[str]) -> int | None:
    """Run ``-m MODULE ARGS`` / ``-c CODE ARGS`` like the interpreter; ``None`` when argv is not that."""
    i = 0
    while i < len(argv) and argv[i] in ISOLATION_FLAGS:
        i += 1
    if i >= len(argv) - 1 or argv[i] not in ("-m", "-c"):
        if i:
            print(f"segstudio: this bundle runs only -m MODULE or -c CODE, not {' '.join(argv)}", file=sys.stderr)
            return 2
        return None
    flag, target, rest = argv[i], argv[i + 1], argv[i + 2:]
    try:
        if flag == "-m":
            sys.argv = [target, *rest]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *rest]
            exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    return 0


def main() -> int:
    multiprocessing.freeze_support()  # a multiprocessing child (Dask's workers) runs its target and exits here
    code = _as_python(sys.argv[1:])
    if code is not None:
        return code
    from segstudio.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
