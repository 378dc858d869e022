"""`rtvamp worker`, `rtvamp keys` and `rtvamp pool up/down/status`: the scale-out commands.

`rtvamp.cli` calls :func:`register_cli` with its subparsers. Errors are raised as ValueError
(KeysError, InsecureBindError, …) or SystemExit with the worker's exit code; Ray is imported
only by the pool commands.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(stderr=True, soft_wrap=True)


def register_cli(subparsers: argparse._SubParsersAction, keys: bool = True) -> None:
    """Add `worker`, `pool` and (unless another module adds it) `keys` to the `rtvamp` command line."""
    _add_worker(subparsers)
    if keys:
        _add_keys(subparsers)
    _add_pool(subparsers)


# -- worker ------------------------------------------------------------------------------------

def _add_worker(subparsers: argparse._SubParsersAction) -> None:
    from .keys import default_keys_dir

    worker = subparsers.add_parser("worker", help="serve vamp jobs to engines on other machines (a GPU box)")
    worker.add_argument("--bind", default="tcp://127.0.0.1:5555",
                        help="ZeroMQ endpoint; an address other machines can reach (tcp://0.0.0.0:5555, "
                        "tcp://192.168.1.20:5555) needs --curve-keys (default: %(default)s)")
    worker.add_argument("--curve-keys", nargs="?", const="", metavar="DIR",
                        help=f"CURVE keys folder: server.key_secret + authorized/*.key (default: {default_keys_dir()})")
    worker.add_argument("--bundle", help="bundle folder or installed name (default: embedded tiny)")
    worker.add_argument("--max-batch", type=int, default=4, help="most candidates per job")
    worker.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8"],
                        help="transformer precision (auto: int8 on the CPU when the bundle's int8 agrees with fp32, "
                        "else fp32; default: %(default)s)")
    worker.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority")
    worker.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> None:
    from .worker import main

    argv = ["--bind", args.bind, "--max-batch", str(args.max_batch), "--nice", str(args.nice),
            "--precision", args.precision]
    if args.curve_keys is not None:
        argv += ["--curve-keys", args.curve_keys] if args.curve_keys else ["--curve-keys"]
    if args.bundle:
        argv += ["--bundle", args.bundle]
    code = main(argv)
    if code:
        raise SystemExit(code)


# -- keys --------------------------------------------------------------------------------------

def _add_keys(subparsers: argparse._SubParsersAction) -> None:
    from .keys import default_keys_dir

    keys = subparsers.add_parser(
        "keys", help="CURVE keys for remote workers and bridges (no sub-command: `init`)",
        description="Keypairs in one folder: NAME.key (public, share it) and NAME.key_secret (never leaves this "
                    f"machine); authorized/ holds the client keys a server accepts. Folder: {default_keys_dir()}")
    keys.add_argument("--dir", help="keys folder (default: the per-user one)")
    keys.set_defaults(func=cmd_keys_init)
    sub = keys.add_subparsers(dest="keys_command")
    init = sub.add_parser("init", help="server and client keypairs (when missing), the client authorized")
    init.set_defaults(func=cmd_keys_init)
    new = sub.add_parser("new", help="a named keypair")
    new.add_argument("name")
    new.add_argument("--force", action="store_true", help="replace an existing keypair")
    new.set_defaults(func=cmd_keys_new)
    auth = sub.add_parser("authorize", help="accept a client: copy its public .key into authorized/")
    auth.add_argument("public_key", help="the client's NAME.key file")
    auth.set_defaults(func=cmd_keys_authorize)
    show = sub.add_parser("list", help="keypairs and authorized keys in the folder")
    show.set_defaults(func=cmd_keys_list)


def cmd_keys_init(args: argparse.Namespace) -> None:
    from .keys import init_keys, keys_dir

    init_keys(args.dir)
    cmd_keys_list(args)
    folder = keys_dir(args.dir)
    console.print(f"GPU box: `rtvamp worker --bind tcp://0.0.0.0:5555 --curve-keys {folder}`. Laptop: copy "
                  "server.key and client.key_secret into its keys folder, then "
                  "`rtvamp live --backend tcp://GPU-BOX:5555`. More clients: `rtvamp keys new NAME` on the "
                  "client, `rtvamp keys authorize NAME.key` on the server.")


def cmd_keys_new(args: argparse.Namespace) -> None:
    from .keys import create_keypair, keys_dir

    pair = create_keypair(args.name, args.dir, overwrite=args.force)
    print(keys_dir(args.dir) / f"{pair.name}.key")


def cmd_keys_authorize(args: argparse.Namespace) -> None:
    from .keys import authorize

    print(authorize(args.public_key, args.dir))


def cmd_keys_list(args: argparse.Namespace) -> None:
    from .keys import AUTHORIZED, load_public_key, keys_dir

    folder = keys_dir(args.dir)
    table = Table(title=f"keys in {folder}")
    for column in ("file", "public key", "secret here"):
        table.add_column(column)
    files = sorted(folder.glob("*.key")) + sorted((folder / AUTHORIZED).glob("*.key"))
    for path in files:
        table.add_row(str(path.relative_to(folder)), load_public_key(path).decode(),
                      "yes" if path.with_suffix(".key_secret").exists() else "")
    console.print(table)


# -- pool --------------------------------------------------------------------------------------

def _add_pool(subparsers: argparse._SubParsersAction) -> None:
    pool = subparsers.add_parser("pool", help="a Ray Serve pool of vamp replicas (needs the `cluster` extra)")
    sub = pool.add_subparsers(dest="pool_command", required=True)
    up = sub.add_parser("up", help="deploy (or update) the pool on a Ray cluster")
    up.add_argument("--address", default="auto",
                    help="Ray cluster: auto (the one `ray start --head` runs here), HOST:PORT (its GCS), or local "
                    "(start one in this process and serve until Ctrl-C)")
    up.add_argument("--config", help="pool TOML (default: the packaged rtvamp/cluster/pool.toml)")
    up.add_argument("--replicas", help="replica count, or `auto` for autoscaling (overrides the TOML)")
    up.add_argument("--gpus-per-replica", type=float, help="GPUs each replica holds (overrides the TOML)")
    up.add_argument("--bundle", help="default bundle of jobs that name none (overrides the TOML)")
    up.add_argument("--precision", choices=["auto", "fp32", "int8"],
                    help="transformer precision of the replicas (overrides the TOML; default auto: int8 on CPU "
                    "replicas when the bundle's int8 agrees with fp32)")
    up.set_defaults(func=cmd_pool_up)
    down = sub.add_parser("down", help="delete the pool's Serve application")
    down.add_argument("--address", default="auto")
    down.add_argument("--config", help="pool TOML (for the application name)")
    down.set_defaults(func=cmd_pool_down)
    status = sub.add_parser("status", help="the pool's replicas and their states")
    status.add_argument("--address", default="auto")
    status.add_argument("--config", help="pool TOML (for the application name)")
    status.set_defaults(func=cmd_pool_status)


def _pool():
    try:
        from ..cluster import pool
    except ImportError as exc:
        raise ValueError(f"the pool needs the `cluster` extra ({exc.name} is missing): "
                         "pip install 'rtvamp[cluster]'") from None
    return pool


def _config(args: argparse.Namespace):
    pool = _pool()
    config = pool.load_config(Path(args.config) if args.config else None)
    if getattr(args, "replicas", None):
        config = config.with_replicas(args.replicas)
    if getattr(args, "gpus_per_replica", None) is not None:
        config = config.with_gpus(args.gpus_per_replica)
    if getattr(args, "bundle", None):
        config = config.with_bundle(args.bundle)
    if getattr(args, "precision", None):
        config = config.with_precision(args.precision)
    return config


def cmd_pool_up(args: argparse.Namespace) -> None:
    pool = _pool()
    config = _config(args)
    url = pool.up(config, args.address)
    console.print(f"pool {config.name!r} is up: engines inside the cluster use `--backend ray`, others "
                  f"`--backend {url}`")
    print(url)
    if args.address == "local":
        pool.serve_forever(config)


def cmd_pool_down(args: argparse.Namespace) -> None:
    pool = _pool()
    config = _config(args)
    pool.down(config, args.address)
    console.print(f"pool {config.name!r} deleted")


def cmd_pool_status(args: argparse.Namespace) -> None:
    pool = _pool()
    config = _config(args)
    table = Table(title=f"pool {config.name!r}")
    for column in ("deployment", "status", "replicas", "message"):
        table.add_column(column)
    for row in pool.status(config, args.address):
        table.add_row(row.deployment, row.status, ", ".join(f"{n} {s}" for s, n in row.replicas.items()),
                      row.message)
    console.print(table)
