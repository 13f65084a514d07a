"""Make ``httptools`` and ``uvloop`` unimportable, to test the code paths of the single-file build.

With this folder on PYTHONPATH every Python process (pytest, the daemons it starts, their
runtimes) behaves as if those C extensions were not installed, so the daemon runs on the default
asyncio loop and h11 (``lambda_rapid.http.h11_parser``), exactly as ``bin/lambda-runtime-api-daemon``
does:

    PYTHONPATH=tools/pure-python .venv/bin/pytest -q tests --ignore tests/test_httpparser.py \
        --ignore tests/test_httpserver.py

(those two compare h11 against httptools, so they need the real one.)
"""

import sys


class _HideCExtensions:
    blocked = ("httptools", "uvloop")

    def find_spec(self, name, path=None, target=None):
        if name.split(".", 1)[0] in self.blocked:
            raise ImportError(f"{name} is hidden by tools/pure-python/sitecustomize.py")
        return None


sys.meta_path.insert(0, _HideCExtensions())
