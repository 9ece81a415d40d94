"""A TVM RPC server that also reports what it runs: ``python -m hwcompress.rpc_server``.

It is TVM's own ``tvm.rpc.Server`` (same protocol, same tracker registration, same options as
``python -m tvm.exec.rpc_server``) with one extra remote function, ``hwc.remote_info``, so that
``hwc device check`` can report the board's TVM version and machine. Needs only TVM on the board.
"""

from __future__ import annotations

import argparse
import json
import platform


def _register_info() -> None:
    import tvm
    import tvm_ffi

    info = {"tvm": tvm.__version__, "machine": platform.machine(), "system": platform.system(),
            "python": platform.python_version()}

    @tvm_ffi.register_global_func("hwc.remote_info", override=True)
    def remote_info() -> str:
        return json.dumps(info)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=9091)
    parser.add_argument("--port-end", type=int, default=9199)
    parser.add_argument("--tracker", help="tracker address HOST:PORT")
    parser.add_argument("--key", default="", help="device key to register under")
    parser.add_argument("--custom-addr", help="address the tracker should hand out for this server")
    args = parser.parse_args(argv)
    from tvm import rpc

    tracker = None
    if args.tracker:
        host, _, port = args.tracker.rpartition(":")
        tracker = (host, int(port))
    _register_info()
    server = rpc.Server(args.host, args.port, args.port_end, key=args.key, tracker_addr=tracker,
                        custom_addr=args.custom_addr, server_init_callback=_register_info)
    server.proc.join()


if __name__ == "__main__":
    main()
