"""Command line of the web front end: parse, check the bind address and token, start the server."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()         # start-up times in the log count from here


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m EchoFMSlicer.web",
                                description="EchoFM cine-loop workflow in the browser (trame-slicer).")
    p.add_argument("paths", nargs="*", help="cine files or DICOM folders to load at start")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--models", default=None, help="models folder (default $ECHOFM_MODELS or ~/.echofm/models)")
    p.add_argument("--token", default=None, help="secret the page must present (required off loopback); "
                   "open http://HOST:PORT/?secret=TOKEN")
    p.add_argument("--export", default=None, help="export folder for corrections (default ~/EchoFM/corrections)")
    p.add_argument("--bench", action="store_true", help="benchmark instead of serving: start-up to the first "
                   "image and frame-change re-render in headless Chromium, on the one PATH given")
    return p.parse_args(argv)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> int:
    args = parse_args(argv)
    if not is_loopback(args.host) and not args.token:
        print(f"refusing to serve on {args.host}: another address than loopback needs --token", file=sys.stderr)
        return 2
    for p in args.paths:
        if not Path(p).exists():
            print(f"{p}: no such file or folder", file=sys.stderr)
            return 2
    if args.bench:
        if len(args.paths) != 1:
            print("--bench needs exactly one cine PATH", file=sys.stderr)
            return 2
        from .bench import main as bench  # deferred: the benchmark loads Chromium's driver; only --bench needs it
        return bench(args.paths[0])
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("EchoFM").setLevel(logging.INFO)  # ours at INFO; trame's INFO is thousands of lines per start
    # deferred: trame and Slicer's core load after argument checks, so --help and errors stay fast
    from .app import EchoFMWebApp
    app = EchoFMWebApp(models_folder=args.models, export_folder=args.export)
    log = logging.getLogger("EchoFM.web")
    log.info(f"start-up: imports and the scene's view took {time.perf_counter() - STARTED:.2f} s")
    app.start(paths=args.paths, host=args.host, port=args.port, token=args.token, started=STARTED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
