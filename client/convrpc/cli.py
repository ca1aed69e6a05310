"""The ``convrpc`` command: ``serve`` a server, run the ``demo``, probe ``health``, show server ``info``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import numpy as np

from convrpc.core import config

SERVER_EXTRA_HINT = "the server needs its extra: pip install -e '.[server]' in a clone of convrpc"


def _server_modules():
    try:
        from convrpc import server
    except ImportError as exc:
        sys.exit(f"convrpc: {SERVER_EXTRA_HINT} ({exc})")
    return server


def _settings_fields():
    """The server's knobs (dataclass fields), or () when the server extra is not installed."""
    try:
        import dataclasses

        from convrpc.server.settings import Settings
    except ImportError:
        return ()
    return dataclasses.fields(Settings)


def _exit_on_signal(signum, frame):
    raise SystemExit(0)  # nothing to drain yet: the server's own handlers replace this one once it is built


def cmd_serve(args) -> int:
    # First, before the slow imports: a stop signal during start-up ends the process at once.
    previous = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = _server_modules()
        from convrpc.core.errors import ConvError

        flags = {f.name: getattr(args, f.name, None) for f in _settings_fields()}
        try:
            settings = server.Settings.load(args.config, flags=flags)
            if args.print_config:
                print(settings.to_toml(), end="")
                return 0
            return server.serve(settings)
        except (server.ConfigError, ConvError) as exc:
            sys.exit(f"convrpc serve: {exc}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _read_pem(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        sys.exit(f"convrpc: cannot read {path}: {exc.strerror}")


def _security_kwargs(args) -> dict:
    """ConvClient keyword arguments for the TLS and token options of ``health`` and ``info``."""
    kwargs = dict(
        root_certificates=_read_pem(args.tls_ca),
        private_key=_read_pem(args.tls_key),
        certificate_chain=_read_pem(args.tls_cert),
    )
    if (kwargs["private_key"] is None) != (kwargs["certificate_chain"] is None):
        sys.exit("convrpc: --tls-cert and --tls-key go together")
    if args.tls_server_name:
        kwargs["options"] = [("grpc.ssl_target_name_override", args.tls_server_name)]
    return kwargs


def _wait_warm(server) -> None:
    """Wait for a local server's warm-up, showing how far the kernel compilation got."""
    shown = None
    while not server.wait_ready(timeout=0.5):
        done, total = server.warm_up_progress
        if total and (done, total) != shown:
            shown = (done, total)
            print(f"  compiling kernels {done}/{total} (first start only: they are cached on disk)", flush=True)


def cmd_demo(args) -> int:
    """Fit the 3x3 edge kernel of an 80x80 image through TrainKernel and check it was recovered."""
    from convrpc.client import ConvClient, ConvRpcError
    from convrpc.core.samples import EDGE_KERNEL, structured_image

    local = None
    target = args.target
    if target is None:
        server = _server_modules()
        print(f"starting a local server (backend {args.backend}) on 127.0.0.1 ...", flush=True)
        local = server.ConvServer(server.Settings(host="127.0.0.1", port=0, backend=args.backend)).start()
        started = time.perf_counter()
        _wait_warm(local)
        print(f"server ready on {local.target} after {time.perf_counter() - started:.1f} s of kernel warm-up")
        target = local.target
    try:
        with ConvClient(target, timeout=args.timeout) as client:
            try:
                info = client.server_info(timeout=min(args.timeout, 10.0))
            except ConvRpcError as exc:
                print(f"convrpc demo: no convrpc server answers at {target} ({exc.code.name}: {exc.message})",
                      file=sys.stderr)  # fmt: skip
                return 1
            print(f"connected to convrpc {info.version} at {target}: backend {info.backend} on {info.device}")
            image = structured_image(80)[None, None]
            true_kernel = EDGE_KERNEL[None, None]
            goal = client.conv2d(image, true_kernel)
            print(f"target = conv2d(80x80 image, edge kernel) -> {goal.shape[2]}x{goal.shape[3]}")
            print(f"fitting a 3x3 kernel: SGD lr 0.5 on half_mse, until loss < {args.tol:g} (at most {args.max_steps} steps)")
            run = client.train_kernel(
                image, goal, kernel_size=3, lr=0.5, loss="half_mse", tol=args.tol, max_steps=args.max_steps, seed=0
            )
            for update in run:  # the server sends at most one update per report interval (50 ms)
                print(f"  step {update.step:6d}  loss {update.loss:.3e}  ({update.elapsed:.2f} s)", flush=True)
            result = run.result()
    finally:
        if local is not None:
            local.stop(0)
    print(f"stopped: {result.stop_reason} after {result.steps} steps, loss {result.loss:.3e}, {result.elapsed:.2f} s")
    np.set_printoptions(precision=4, suppress=True)
    learned = result.weight[0, 0]
    print("true kernel:\n", EDGE_KERNEL, "\nlearned kernel:\n", learned, sep="")
    ok = bool(np.allclose(learned, EDGE_KERNEL, atol=1e-2))
    print(f"allclose(learned, true, atol=1e-2): {ok}")
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            ax = result.plot(title="convrpc demo: fitting the edge kernel")
            ax.figure.savefig(args.plot, dpi=120, bbox_inches="tight")
            print(f"loss curve written to {args.plot}")
        except ImportError:
            print("matplotlib is not installed; no loss curve (pip install -e '.[notebook]' in a clone of convrpc)")
    return 0 if ok else 1


def _local_health_target(environ) -> str:
    """The server of this machine or container: its plaintext health port when it has one (it answers
    whatever TLS the gRPC port requires), else its gRPC port."""
    port = environ.get("CONVRPC_HEALTH_PORT", "0").strip()
    if port in ("", "0"):
        port = environ.get("CONVRPC_PORT", "").strip() or str(config.DEFAULT_PORT)
    return f"127.0.0.1:{port}"


def cmd_health(args) -> int:
    """Exit 0 when the server reports SERVING, 1 otherwise (for container health checks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from convrpc.client.channel import credentials

    security = _security_kwargs(args)
    creds = credentials(security["root_certificates"], security["private_key"], security["certificate_chain"])
    options = security.get("options", [])
    if creds is None:
        channel = grpc.insecure_channel(args.target, options)
    else:
        channel = grpc.secure_channel(args.target, creds, options)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"{args.target}: {error.code().name}: {error.details()}")
            return 1
    state = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{args.target}: {state}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_info(args) -> int:
    from convrpc.client import ConvClient, ConvRpcError

    try:
        with ConvClient(args.target, timeout=args.timeout, token=args.token, **_security_kwargs(args)) as client:
            print(client.server_info())
    except ConvRpcError as exc:
        print(f"{args.target}: {exc}")
        return 1
    return 0


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per server setting: ``--kebab-case`` of the field, its type, its help and its env name."""
    fields = _settings_fields()
    if not fields:
        parser.add_argument("unavailable", nargs=argparse.REMAINDER, help=SERVER_EXTRA_HINT)
        return
    from convrpc.server.settings import env_name, flag_name

    kinds = {"int": int, "float": float, "str": str}
    for f in fields:
        if f.metadata.get("flag") is False:
            continue
        shown = f.default if f.default != "" else "unset"
        help_text = f"{f.metadata['help']} (default {shown}; env {env_name(f.name)})"
        if f.type == "bool":
            parser.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = None if f.metadata.get("choices") else f.metadata.get("metavar", f.type.upper())
            parser.add_argument(flag_name(f.name), type=kinds[f.type], choices=f.metadata.get("choices"),
                                default=None, metavar=metavar, help=help_text)  # fmt: skip


def _add_client_security_flags(parser: argparse.ArgumentParser, *, token: bool) -> None:
    parser.add_argument("--tls-ca", metavar="PEM", help="CA bundle to verify the server with (switches to TLS)")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate chain, for mutual TLS")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    parser.add_argument("--tls-server-name", help="name the server's certificate must carry, if not the target's host")
    if token:
        parser.add_argument("--token", default=os.environ.get("CONVRPC_TOKEN"),
                            help="bearer token (default: env CONVRPC_TOKEN)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convrpc", description="2-D convolution compute as a gRPC service.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run a server until SIGTERM/SIGINT",
        description="Run a convrpc server. Each setting comes from (lowest to highest precedence) its default, "
        "the --config TOML file (same key), the environment variable CONVRPC_<KEY> and the flag below. "
        "Bearer tokens may also be given as CONVRPC_AUTH_TOKENS (comma-separated; env or TOML only).",
    )
    serve.add_argument("--config", default=os.environ.get("CONVRPC_CONFIG"), metavar="TOML",
                       help="TOML file of settings, keys as the flags' names with underscores (env CONVRPC_CONFIG)")
    serve.add_argument("--print-config", action="store_true", help="print the effective settings as TOML and exit")
    _add_settings_flags(serve)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="fit the edge kernel of an 80x80 image through a server, end to end")
    demo.add_argument("--target", help="host:port of a running server (default: start one in this process)")
    demo.add_argument("--backend", default=config.DEFAULT_BACKEND, choices=("auto", "numpy", "numba", "cupy"), help="backend of the local server")
    demo.add_argument("--tol", type=float, default=1e-7, help="stop once the loss is below this (default 1e-7)")
    demo.add_argument("--max-steps", type=int, default=10000, help="most optimizer steps (default 10000)")
    demo.add_argument("--timeout", type=float, default=600.0, help="deadline of each call in seconds (default 600)")
    demo.add_argument("--plot", default="convrpc-demo-loss.png", help="where to write the loss curve PNG ('' for none)")
    demo.set_defaults(func=cmd_demo)

    defaults = argparse.ArgumentDefaultsHelpFormatter
    health = sub.add_parser(
        "health", help="probe a server's gRPC health; exit 0 when SERVING", formatter_class=defaults
    )
    health.add_argument("--target", default=_local_health_target(os.environ),
                        help="host:port to probe: 127.0.0.1 and the port of env CONVRPC_HEALTH_PORT, else "
                        f"CONVRPC_PORT, else {config.DEFAULT_PORT} (inside the image, the plaintext health port)")  # fmt: skip
    health.add_argument("--service", default="", help="service name to check ('' is the whole server)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    _add_client_security_flags(health, token=False)
    health.set_defaults(func=cmd_health)

    info = sub.add_parser("info", help="print a server's version, backend, device and limits", formatter_class=defaults)
    info.add_argument("--target", default=f"127.0.0.1:{config.DEFAULT_PORT}", help="host:port or gRPC name")
    info.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    _add_client_security_flags(info, token=True)
    info.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
