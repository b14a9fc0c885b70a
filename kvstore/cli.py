"""`kvstore`: the server command line (`kvstore serve`)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from kvstore import __version__
from kvstore.config import DEFAULT_LISTEN, add_flags, load_config
from kvstore.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvstore", description="KV-cache storage and transfer service for LLM inference")
    parser.add_argument("--version", action="version", version=f"kvstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help=f"run a server (default listen {DEFAULT_LISTEN})")
    serve.add_argument("--config", dest="config_file", default=None, help="TOML config file ([server] table)")
    add_flags(serve)
    args = vars(parser.parse_args(argv))
    command, config_file = args.pop("command"), args.pop("config_file")
    if command == "serve":
        try:
            cfg = load_config(config_file, flags=args)
        except (ValueError, OSError) as err:
            parser.error(str(err))
        setup_logging(cfg.log_level)
        from kvstore.server import KVStoreServer

        try:
            server = KVStoreServer(cfg)
        except (ValueError, OSError) as err:
            parser.error(str(err))
        _exit_after(server.serve_forever)
    return 0


def _exit_after(serve) -> None:
    """Run serve (which returns once the store is flushed), then end the process at once: a gRPC worker stuck
    in a call, or any other non-daemon thread, must not keep a stopped server alive."""
    log = logging.getLogger("kvstore.cli")
    code = 0
    try:
        serve()
    except BaseException:
        log.exception("kvstore did not shut down cleanly")
        code = 1
    log.info("exiting")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
