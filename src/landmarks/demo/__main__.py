"""python -m landmarks.demo generate|serve: the command line of the demo (see the package docstring)."""

from __future__ import annotations

import argparse
import asyncio
import json

from ..common import StageError, run_cli, setup_logging
from ..config import ConfigError, section_settings
from . import __doc__ as package_doc
from . import server


def _parser() -> argparse.ArgumentParser:
    url_scheme = server.__doc__[server.__doc__.index("URL scheme") :]
    parser = argparse.ArgumentParser(
        prog="python -m landmarks.demo",
        description=package_doc.split("\n\n")[0],
        epilog=url_scheme,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write the synthetic photo set, urls.csv and faults.csv")
    gen.add_argument("--out", required=True, help="output folder (e.g. data/demo)")
    gen.add_argument(
        "--settings",
        default="{}",
        help="JSON object of demo settings (config.yaml's demo section: seed, landmarks, views_per_landmark, "
        "nonlandmarks, broken_fraction, new_photos; host and port make the URLs); defaults fill the rest",
    )
    gen.add_argument(
        "--base-url", default=None, help="where the server will serve the set (default: http://<host>:<port>)"
    )
    gen.add_argument("--workers", type=int, default=None, help="processes (default: available CPUs)")
    gen.add_argument("-v", "--verbose", action="store_true")

    srv = sub.add_parser("serve", help="serve a generated set over HTTP, with fault URLs")
    srv.add_argument("--root", required=True, help="the folder `generate` writes (it may not exist yet)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8765)
    srv.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    srv.add_argument("--ready-file", default=None, help="written (JSON) once connections are accepted")
    srv.add_argument("--slow-seconds", type=float, default=600.0, help="delay of /fault/slow/ responses")
    srv.add_argument("--no-access-log", action="store_true", help="do not log every request")
    srv.add_argument("-v", "--verbose", action="store_true")
    return parser


def load_settings(settings_json: str) -> dict:
    """config.yaml's demo section from --settings, validated by its schema, defaults filled in."""
    try:
        values = json.loads(settings_json)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--settings is not valid JSON: {err}") from err
    return section_settings("demo", values, "--settings")


def _generate(args) -> int:
    # Imported here, not at the top: `serve` (the Snakefile's onstart) never loads the drawing modules.
    from .generate import generate, settings_arguments

    arguments = settings_arguments(load_settings(args.settings))
    if args.base_url is not None:
        arguments["base_url"] = args.base_url
    counts = generate(args.out, workers=args.workers, **arguments)
    print(json.dumps(counts, sort_keys=True))
    return 0


def _serve(args) -> int:
    if args.parent_pid is not None and not server.process_alive(args.parent_pid):
        raise StageError(f"parent process {args.parent_pid} does not exist")
    asyncio.run(
        server.serve(
            args.root,
            args.host,
            args.port,
            parent_pid=args.parent_pid,
            ready_file=args.ready_file,
            slow_seconds=args.slow_seconds,
            access_log=not args.no_access_log,
        )
    )
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    return _generate(args) if args.command == "generate" else _serve(args)


if __name__ == "__main__":
    run_cli(main)
