"""`rtvamp serve`, `rtvamp ctl …` and `rtvamp keys`: the bridge's command line.

`register_cli(subparsers)` adds the three subcommands to the `rtvamp` parser; ``python -m
rtvamp.bridge.cli`` runs them on their own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path

from rich.console import Console

from .wire import DEFAULT_ENDPOINT, Endpoints

console = Console(stderr=True, soft_wrap=True)


def default_keys_dir() -> Path:
    """Where `rtvamp keys` writes by default (the per-user config folder)."""
    from platformdirs import user_config_path

    return user_config_path("rtvamp") / "keys"


# -- keys ----------------------------------------------------------------------------------------

def generate_keys(folder: Path, force: bool = False) -> Path:
    """A CURVE keypair for the engine and one for a client, the client authorised:
    server.key / server.key_secret, client.key / client.key_secret, authorized/client.key."""
    import zmq.auth

    folder = Path(folder)
    if (folder / "server.key_secret").exists() and not force:
        raise FileExistsError(f"{folder} already holds keys (--force replaces them)")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    for name in ("server", "client"):
        zmq.auth.create_certificates(folder, name)
        (folder / f"{name}.key_secret").chmod(0o600)
    authorized = folder / "authorized"
    authorized.mkdir(exist_ok=True)
    shutil.copy(folder / "client.key", authorized / "client.key")
    return folder


def cmd_keys(args: argparse.Namespace) -> None:
    folder = generate_keys(Path(args.dir) if args.dir else default_keys_dir(), args.force)
    console.print(f"CURVE keys in {folder}: give a client [bold]server.key[/] and [bold]client.key_secret[/]; "
                  f"authorise more clients by copying their public .key files into {folder / 'authorized'}")
    print(folder)


# -- serve ---------------------------------------------------------------------------------------

def _server_keys(args: argparse.Namespace):
    from .server import ServerKeys

    if args.keys:
        return ServerKeys.load(Path(args.keys))
    if not Endpoints.parse(args.bind).loopback and (default_keys_dir() / "server.key_secret").is_file():
        return ServerKeys.load(default_keys_dir())
    return None  # BridgeServer refuses a non-loopback bind without keys


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> None:
    from ..engine.core import CoreConfig
    from ..engine.engine import Engine, EngineConfig
    from .server import BridgeServer, ServeOptions, SwitchableBackend

    options = ServeOptions(bind=args.bind, keys=_server_keys(args), session_timeout_s=args.session_timeout,
                           realtime=args.realtime)
    BridgeServer.check(options)
    sys.setswitchinterval(0.0005)  # the bridge's audio thread never waits long behind the others
    backend = SwitchableBackend(args.bundle, max_batch=args.variations, precision=args.precision)
    with console.status("starting the worker (loads the model)…"):
        backend.start()
    core = CoreConfig(sample_rate=args.rate, channels=args.channels, crossfade_ms=args.crossfade_ms,
                      max_block_frames=max(4096, args.max_block))
    engine = Engine(backend, EngineConfig(core=core, bpm=args.bpm))
    engine.core.post("gains", 0.0, 1.0)  # wet only: the plugin mixes its own dry signal
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with BridgeServer(engine, options) as server:
            e = server.endpoints
            console.print(f"[bold]rtvamp serve[/]: audio {e.audio}, control {e.control}, state {e.state} "
                          f"({args.rate} Hz, {args.channels} ch, CURVE {'on' if options.keys else 'off'}, "
                          f"real-time {'on' if server.realtime else 'not permitted' if args.realtime else 'off'}); "
                          "latency = jitter blocks × block frames, stated in each handshake")
            print(f"serving {e.audio}", flush=True)
            stop = time.monotonic() + args.duration if args.duration else None
            try:
                while stop is None or time.monotonic() < stop:
                    time.sleep(0.2)
            except KeyboardInterrupt:
                pass
            stats = dict(server.stats)
    finally:
        engine.close()
    console.print("bridge: " + ", ".join(f"{k} {v}" for k, v in stats.items() if v))


# -- ctl -----------------------------------------------------------------------------------------

def _client_keys(args: argparse.Namespace):
    from .client import ClientKeys

    if args.keys:
        return ClientKeys.load(Path(args.keys))
    if not Endpoints.parse(args.connect).loopback and (default_keys_dir() / "client.key_secret").is_file():
        return ClientKeys.load(default_keys_dir())
    return None


def _value(text: str):
    """A parameter value from the shell: JSON (0.5, true, null, "x") or a bare word."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def cmd_ctl(args: argparse.Namespace) -> None:
    import msgspec

    from .client import ControlClient

    with ControlClient(args.connect, keys=_client_keys(args), timeout_s=args.timeout) as ctl:
        action = args.action
        if action == "trigger":
            fields = {k: getattr(args, k) for k in ("source", "bars", "quantize", "preset", "temperature",
                                                    "variations", "seed") if getattr(args, k) is not None}
            if args.steps is not None:
                fields["steps"] = int(args.steps) if args.steps.isdigit() else args.steps
            result = ctl.trigger(**fields)
        elif action == "set":
            result = ctl.set(args.name, _value(args.value))
        elif action == "command":
            result = ctl.command(args.name)
        elif action == "learn":
            fields = {"mode": args.mode, "min": args.min, "max": args.max, "scale": args.scale}
            if args.channel is not None:
                fields["channel"] = args.channel
            if args.note is not None:
                fields.update(kind="note", number=args.note)
            elif args.cc is not None:
                fields.update(kind="cc", number=args.cc)
            result = ctl.learn(args.target, **fields)
        elif action == "forget":
            result = ctl.forget(args.target)
        elif action == "midi":
            result = ctl.midi(bytes.fromhex("".join(args.bytes)))
        elif action == "load-bundle":
            with console.status(f"starting a worker for {args.bundle}…"):
                result = ctl.load_bundle(args.bundle)
        elif args.watch:
            feed = ctl.subscribe()
            try:
                for state in feed:
                    print(msgspec.json.encode(state).decode(), flush=True)
            except KeyboardInterrupt:
                return
            finally:
                feed.close()
        else:
            result = ctl.state()
    print(msgspec.json.encode(result).decode())


# -- parsers -------------------------------------------------------------------------------------

def register_cli(subparsers, keys: bool = True) -> None:
    """Add `serve`, `ctl` and (unless `keys` is False: another module adds it with the same
    folder layout) `keys` to the `rtvamp` subparsers."""
    from ..masks import PRESETS

    serve = subparsers.add_parser("serve", help="the DAW bridge: a plugin's blocks drive the engine")
    serve.add_argument("--bind", default=DEFAULT_ENDPOINT,
                       help="audio endpoint tcp://HOST:PORT (control PORT+1, state PORT+2); loopback unless "
                            "CURVE keys are given")
    serve.add_argument("--keys", help="CURVE key folder from `rtvamp keys` (required off loopback)")
    serve.add_argument("--rate", type=int, default=44100, help="the DAW's sample rate")
    serve.add_argument("--channels", type=int, default=2)
    serve.add_argument("--max-block", type=int, default=4096, help="largest DAW block (frames)")
    serve.add_argument("--bpm", type=float, default=120.0, help="tempo until the DAW's transport says otherwise")
    serve.add_argument("--variations", type=int, default=2, help="most candidates per vamp")
    serve.add_argument("--crossfade-ms", type=float, default=20.0)
    serve.add_argument("--session-timeout", type=float, default=2.0, help="seconds before a silent stream ends")
    serve.add_argument("--duration", type=float, help="stop after this many seconds")
    serve.add_argument("--realtime", action="store_true",
                       help="run the audio thread SCHED_FIFO (lowest priority) where permitted: replies on time on "
                            "a loaded machine")
    serve.add_argument("--bundle", help="bundle folder or installed name (default: embedded tiny)")
    serve.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8"],
                       help="transformer precision (auto: int8 on the CPU when the bundle's int8 agrees with fp32)")
    serve.set_defaults(func=cmd_serve)

    ctl = subparsers.add_parser("ctl", help="control a running `rtvamp serve` (trigger, set, state, learn)")
    ctl.add_argument("--connect", default=DEFAULT_ENDPOINT, help="the engine's audio endpoint tcp://HOST:PORT")
    ctl.add_argument("--keys", help="CURVE key folder (client.key_secret, server.key)")
    ctl.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    actions = ctl.add_subparsers(dest="action", required=True)
    trig = actions.add_parser("trigger", help="vamp now (unset options: the engine's defaults)")
    trig.add_argument("--source", choices=["input", "loop", "output"])
    trig.add_argument("--bars", type=int)
    trig.add_argument("--quantize", choices=["off", "beat", "bar", "loop"])
    trig.add_argument("--preset", choices=sorted(PRESETS))
    trig.add_argument("--steps", help="fast, balanced, quality, upstream or a number")
    trig.add_argument("--temperature", type=float)
    trig.add_argument("--variations", type=int)
    trig.add_argument("--seed", type=int)
    st = actions.add_parser("set", help="set a parameter: VALUE as JSON (0.5, true, null) or a word")
    st.add_argument("name")
    st.add_argument("value")
    cmd = actions.add_parser("command", help="record, stop_record, undo, redo, next, previous, clear, tap, cancel")
    cmd.add_argument("name", choices=["record", "stop_record", "undo", "redo", "next", "previous", "clear", "tap",
                                      "cancel"])
    state = actions.add_parser("state", help="print the engine's state as JSON")
    state.add_argument("--watch", action="store_true", help="print every pushed state (~10 Hz)")
    learn = actions.add_parser("learn", help="map a MIDI CC or note to a parameter or command")
    learn.add_argument("target")
    which = learn.add_mutually_exclusive_group()
    which.add_argument("--cc", type=int, help="bind now (without --cc/--note: arm learn)")
    which.add_argument("--note", type=int)
    learn.add_argument("--channel", type=int, help="0–15 (default: any)")
    learn.add_argument("--mode", default="absolute", choices=["absolute", "toggle", "momentary"])
    learn.add_argument("--min", type=float, default=0.0)
    learn.add_argument("--max", type=float, default=1.0)
    learn.add_argument("--scale", default="linear", choices=["linear", "log"])
    forget = actions.add_parser("forget", help="remove a target's MIDI mappings (* = all)")
    forget.add_argument("target")
    midi = actions.add_parser("midi", help="send a raw MIDI message in hex, e.g. b0 07 64")
    midi.add_argument("bytes", nargs="+")
    load = actions.add_parser("load-bundle", help="restart generation with another bundle")
    load.add_argument("bundle")
    ctl.set_defaults(func=cmd_ctl)

    if keys:
        gen = subparsers.add_parser("keys", help="generate CURVE keys for serving beyond loopback")
        gen.add_argument("--dir", help=f"folder (default {default_keys_dir()})")
        gen.add_argument("--force", action="store_true", help="replace existing keys")
        gen.set_defaults(func=cmd_keys)


def main(argv: list[str] | None = None) -> int:
    """The three subcommands on their own (`python -m rtvamp.bridge.cli serve …`)."""
    parser = argparse.ArgumentParser(prog="rtvamp", description="the rtvamp DAW bridge")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, RuntimeError) as exc:
        console.print(f"[bold red]error[/]: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
