"""Run the factory flow in a subprocess, for tests that kill it mid-run.

    python tests/helpers_flow.py CONFIG.yaml [--hang-at-commit K --marker FILE] [--code-version V]

--hang-at-commit K: the K-th shard commit (0-based, counting this process's commits) blocks forever
  *after* its data was written to data.zarr but *before* its manifest part (the commit marker) is
  published, and FILE is written with that shard's index. The test then kills the process group
  with SIGKILL: a crash in the worst place, with K shards committed and one written but uncommitted.
--code-version V: use V as the code version (the test passes its own, so a source file edited
  between the killed run and the resumed run cannot change cache keys or dataset provenance).

Prefect settings (PREFECT_API_URL of the test server, PREFECT_HOME) come from the environment.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--hang-at-commit", type=int, default=None)
    ap.add_argument("--marker", default=None)
    ap.add_argument("--code-version", default=None)
    args = ap.parse_args()

    import flows.factory as factory_module
    import storage.manifest as manifest_module

    if args.code_version:
        factory_module.code_version = lambda: args.code_version

    if args.hang_at_commit is not None:
        original = manifest_module.write_part
        commits = {"n": 0}
        lock = threading.Lock()

        def write_part(root, index, part):
            with lock:
                k = commits["n"]
                commits["n"] += 1
            if k == args.hang_at_commit:
                Path(args.marker).write_text(str(index))
                threading.Event().wait()  # until SIGKILL
            original(root, index, part)

        manifest_module.write_part = write_part

    summary = factory_module.factory(config=args.config)
    json.dump(summary, sys.stdout, default=str)


if __name__ == "__main__":
    main()
