"""Records the files a `--process_id=1` process writes (tests: only process 0 writes shared files).

On PYTHONPATH with EXVO_WRITE_AUDIT=<file>, a Python audit hook notes every path opened for writing, created,
renamed or removed by a process whose command line has `--process_id=1`, and writes the list to <file> at exit.
Writes made by native code (tensorstore's checkpoint chunks) are not seen.
"""

import atexit
import os
import sys

_OUT = os.environ.get("EXVO_WRITE_AUDIT")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_paths = []


def _hook(event, args):
  if "--process_id=1" not in sys.argv or (event == "open" and args[0] == _OUT):
    return
  if event == "open":
    path, mode, flags = args
    writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
    if writing and isinstance(path, (str, bytes, os.PathLike)):
      _paths.append(os.fsdecode(path))
  elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
    if isinstance(args[0], (str, bytes, os.PathLike)):
      _paths.append(os.fsdecode(args[0]))
  elif event == "os.rename":
    _paths.extend(os.fsdecode(p) for p in args[:2] if isinstance(p, (str, bytes, os.PathLike)))


def _dump():
  if "--process_id=1" in sys.argv:
    with open(_OUT, "w") as f:
      f.write("\n".join(os.path.abspath(p) for p in _paths))


if _OUT:
  sys.addaudithook(_hook)
  atexit.register(_dump)
