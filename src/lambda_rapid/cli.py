"""``lambda-runtime-api-daemon [RIE FLAGS] [CMD ARGS...]``: argv and environment -> Config -> Daemon.

Start-up errors (bad settings, missing bootstrap, a command that cannot run, a port in use) end
the process with one clear line on stderr and exit status 1, before anything is served.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from . import __version__, logs
from . import config as config_module
from .eventloop import new_event_loop

PROG = "lambda-runtime-api-daemon"
USAGE = f"""usage: {PROG} [--runtime-interface-emulator-address HOST:PORT] [--runtime-api-address HOST:PORT]
                                 [--log-level LEVEL] [CMD ARGS...]

Serve one AWS Lambda function over the Invoke API (HTTP) and, with AMQP_URI set, AMQP-RPC.
CMD ARGS is the runtime command, e.g. `python3 -m awslambdaric echo.handler`; without it the
first of /var/task/bootstrap, /opt/bootstrap, /var/runtime/bootstrap is run.
Settings are environment variables: see the README."""


def fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 1


def copy_self_to_tmp() -> int:
    """KUBERNETES_INIT_CONTAINER: put the daemon's executable into /tmp (a shared volume) and exit."""
    import shutil

    source = os.environ.get("LAMBDA_RAPID_EXECUTABLE")
    if not source:
        source = os.path.realpath(sys.argv[0])
        import zipfile

        if not zipfile.is_zipfile(source):
            # A pip console script or ``python -m``: a copy would lack the package it imports.
            return build_single_file_in_tmp()
    target = os.path.join("/tmp", os.path.basename(source))
    try:
        shutil.copy2(source, target)
    except OSError as e:
        return fail(f"cannot copy {source} to {target}: {e}")
    print(f"{PROG}: copied {source} to {target}", file=sys.stderr)
    return 0


def build_single_file_in_tmp() -> int:
    """KUBERNETES_INIT_CONTAINER from a pip install: build the single file from the installed package."""
    from pathlib import Path

    from .singlefile import BuildError, build_installed_daemon

    target = Path("/tmp", PROG)
    try:
        build_installed_daemon(target)
    except (BuildError, OSError) as e:
        return fail(f"KUBERNETES_INIT_CONTAINER: cannot build {target} from the installed package: {e}")
    print(f"{PROG}: built {target} from the installed lambda_rapid {__version__}", file=sys.stderr)
    return 0


def info_requested(args: Sequence[str], prog: str, usage: str) -> bool:
    """Print the usage (-h, --help) or the version (--version) if that is what ``args`` ask for."""
    if args[:1] in (["-h"], ["--help"]):
        print(usage)
        return True
    if args[:1] == ["--version"]:
        print(f"{prog} {__version__}")
        return True
    return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if info_requested(args, PROG, USAGE):
        return 0
    try:
        config = config_module.load(args, os.environ)
    except config_module.ConfigError as e:
        return fail(str(e))
    if config.kubernetes_init_container:
        return copy_self_to_tmp()
    logs.setup(config.log_level, config.structured_logging)

    loop = new_event_loop(tls=bool(config.amqp_uri))  # before anything imports asyncio
    import asyncio

    from .daemon import Daemon, StartupError

    asyncio.set_event_loop(loop)
    try:
        daemon = Daemon(config)
        return loop.run_until_complete(daemon.run())
    except StartupError as e:
        return fail(str(e))
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
