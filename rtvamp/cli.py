"""`rtvamp` command line: demo, vamp, models (convert, verify, list, download)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from rich.console import Console
from rich.table import Table

from . import __version__

console = Console(stderr=True, soft_wrap=True)


class UserError(Exception):
    """An error whose message is the whole story for the user (no traceback)."""


# -- shared --------------------------------------------------------------------------------------


def _progress_bar():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:<8}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), console=console, transient=True)


def _vamp_with_progress(vamper, audio, rate, settings):
    with _progress_bar() as bar:
        tasks = {name: bar.add_task(name, total=1.0) for name in ("coarse", "c2f")}
        return vamper.vamp(audio, rate, settings, progress=lambda stage, done: bar.update(tasks[stage], completed=done))


def _timings_table(title: str, rows: list[tuple[str, dict[str, float]]]) -> Table:
    stages = ("encode", "coarse", "c2f", "decode", "total")
    table = Table(title=title)
    table.add_column("vamp")
    for s in stages:
        table.add_column(f"{s} s", justify="right")
    for name, sec in rows:
        table.add_row(name, *(f"{sec.get(s, sum(sec.values())):.3f}" for s in stages))
    return table


# -- demo / vamp ---------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> None:
    from .bundle import load_bundle
    from .demo import run_demo

    bundle = load_bundle(_bundle(args.bundle) if args.bundle else None)
    console.print(f"[bold]rtvamp demo[/]: a scripted {args.bars}-bar performance at {args.bpm:g} BPM through the "
                  f"live engine (bundle {bundle.manifest.name}, {args.variations} candidates per vamp)")
    if bundle.manifest.name == "tiny":
        console.print("[yellow]note[/]: the embedded tiny model has random weights — its output is not music. "
                      "See README 'Real weights' to convert the official VampNet weights.")
    with console.status("rendering (vamps run in the worker process)…"):
        result = run_demo(Path(args.output), bpm=args.bpm, bars=args.bars, steps=args.steps,
                          variations=args.variations, seed=args.seed, bundle=args.bundle, precision=args.precision)
    table = Table(title="per-vamp timings (seconds)")
    for col in ("#", "source", "bars", "swap at", "status", "encode", "coarse", "c2f", "decode", "latency"):
        table.add_column(col, justify="right")
    for job in result.jobs:
        sec = job.seconds
        table.add_row(str(job.id), job.trigger.source,
                      f"{job.window[0] // result.bar_samples}–{job.window[1] // result.bar_samples - 1}"
                      if job.trigger.source != "loop" else "loop",
                      f"bar {job.swap_at // result.bar_samples}" if job.swap_at is not None else "–", job.status,
                      *(f"{sec.get(k, float('nan')):.3f}" for k in ("encode", "coarse", "c2f", "decode")),
                      f"{job.wall_latency_s:.3f}")
    console.print(table)
    print(result.wav)
    print(result.png)


def _bundle(name_or_path: str):
    from .bundle import resolve_bundle

    return resolve_bundle(name_or_path)


def cmd_vamp(args: argparse.Namespace) -> None:
    from .audio import AudioInputError
    from .files import read_audio, write_audio
    from .vamp import Vamper, VampSettings

    steps = args.steps if args.steps is not None else args.quality
    settings = VampSettings.make(preset=args.preset, steps=steps, c2f_steps=args.c2f_steps,
                                 temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                 variations=args.variations)
    audio, rate = read_audio(args.input, args.max_seconds)
    vamper = Vamper(_bundle(args.bundle) if args.bundle else None, max_batch=args.variations, precision=args.precision)
    console.print(f"transformers: {vamper.precision}")
    try:
        result = _vamp_with_progress(vamper, audio, rate, settings)
    except AudioInputError as exc:
        raise UserError(f"{args.input}: {exc}") from None
    out = Path(args.output)
    for k in range(result.audio.shape[0]):
        path = out if result.audio.shape[0] == 1 else out.with_name(f"{out.stem}_{k + 1}{out.suffix}")
        print(write_audio(path, result.audio[k], rate))
    console.print(_timings_table(str(args.input), [(f"{len(settings.seeds)} variation(s)", result.seconds)]))


# -- live ---------------------------------------------------------------------------------------


def cmd_live(args: argparse.Namespace) -> None:
    from .engine.scheduler import VampParams
    from .live import LiveOptions, run_live

    params = VampParams(preset=args.preset, steps=args.steps, variations=args.variations)
    params.step_counts()  # validate before starting anything
    options = LiveOptions(sample_rate=args.rate, block_frames=args.block, channels=args.channels,
                          input_device=args.input_device, output_device=args.output_device, bpm=args.bpm,
                          bundle=args.bundle, params=params, crossfade_ms=args.crossfade_ms, dry=args.dry,
                          record_dir=Path(args.record) if args.record else None, auto_every_loops=args.auto_every,
                          midi_in=args.midi, midi_out=args.midi_out,
                          midi_map=Path(args.midi_map) if args.midi_map else None, midi_clock=args.midi_clock,
                          midi_api=args.midi_api, backend=args.backend,
                          keys=Path(args.keys) if args.keys else None, precision=args.precision)
    stats = run_live(options, duration_s=args.duration, loop_file=Path(args.loop) if args.loop else None)
    console.print(f"blocks {stats['blocks']}, xruns {sum(stats['xruns'].values())}, "
                  f"callback errors {stats['callback_errors']}, callback p99 {stats['callback_p99']:.1%} of a block")


def cmd_devices(_args: argparse.Namespace) -> None:
    from .io.audio import list_devices

    table = Table(title="audio devices")
    for col in ("index", "name", "host API", "in", "out", "rate"):
        table.add_column(col)
    for d in list_devices():
        table.add_row(str(d.index), d.name, d.hostapi, str(d.max_input_channels), str(d.max_output_channels),
                      f"{d.default_sample_rate:g}")
    console.print(table)


# -- models --------------------------------------------------------------------------------------


def cmd_models_convert(args: argparse.Namespace) -> None:
    try:
        from .convert.export import Sources, convert
    except ImportError as exc:
        raise UserError(f"converting needs the `convert` extra ({exc.name} is missing): "
                        "pip install 'rtvamp[convert]'") from None
    sources = Sources(Path(args.codec), Path(args.coarse), Path(args.c2f),
                      Path(args.lora_coarse) if args.lora_coarse else None,
                      Path(args.lora_c2f) if args.lora_c2f else None)
    report = _convert_with_progress(convert, sources, args.out, args.precision)
    _print_report(report, args.out)


def _convert_with_progress(convert, sources, out, precision):
    from .convert.checkpoint import CheckpointError

    with _progress_bar() as bar:
        task = bar.add_task("convert", total=6)

        def step(msg: str) -> None:
            bar.update(task, advance=1, description=msg[:40])
        try:
            return convert(sources, out, int8=precision != "fp32", progress=step)
        except CheckpointError as exc:
            raise UserError(str(exc)) from None


def _print_report(report, out) -> None:
    table = Table(title=f"bundle {out}")
    table.add_column("graph")
    table.add_column("precision")
    table.add_column("max |torch − onnx|", justify="right")
    table.add_column("int8 top-1 agreement", justify="right")
    for name, entry in report.manifest.files.items():
        err = report.max_abs_error.get(name)
        agree = report.int8_top1_agreement.get(name)
        table.add_row(name, entry["precision"], f"{err:.2e}" if err is not None else "–",
                      f"{agree:.2%}" if agree is not None else "–")
    console.print(table)
    worst = max(report.max_abs_error.values())
    if worst > 1e-3:
        raise UserError(f"the exported graphs differ from the torch modules by {worst:.2e}: do not use this bundle")


def cmd_models_verify(args: argparse.Namespace) -> None:
    from .bundle import load_bundle
    from .codec import Codec
    from .transformer import Transformer

    bundle = load_bundle(_bundle(args.bundle))
    m = bundle.manifest
    codec = Codec(bundle)
    audio = (0.1 * np.random.default_rng(0).standard_normal((1, 1, m.hop_length * 8))).astype(np.float32)
    codes = codec.encode(audio)
    checks = [("hashes and contract", True), ("encoder frames", codes.shape == (1, m.n_codebooks, 8)),
              ("decoder samples", codec.decode(codes).shape == (1, 1, 8 * m.hop_length))]
    for name in ("coarse", "c2f"):
        model = Transformer(bundle, name, 1, 8, precision=args.precision)
        logits = model.logits(codes[:, :model.n_codebooks])
        checks.append((f"{name} logits finite [1, {model.n_predict}, 8, {m.vocab_size}]",
                       logits.shape == (1, model.n_predict, 8, m.vocab_size) and bool(np.isfinite(logits).all())))
    for what, ok in checks:
        console.print(f"{'[green]ok[/]' if ok else '[red]FAILED[/]'}  {what}")
    if not all(ok for _, ok in checks):
        raise UserError(f"{bundle.root}: verification failed")
    print(bundle.root)


def cmd_models_list(_args: argparse.Namespace) -> None:
    from .bundle import BundleError, bundles_dir, default_bundle_path, load_bundle

    table = Table(title="bundles")
    for col in ("name", "path", "precision", "status"):
        table.add_column(col)
    candidates = [default_bundle_path()] + (sorted(p for p in bundles_dir().iterdir() if p.is_dir())
                                            if bundles_dir().is_dir() else [])
    for path in candidates:
        try:
            b = load_bundle(path)
            table.add_row(b.manifest.name, str(path), b.manifest.files["coarse"]["precision"], "ok")
        except BundleError as exc:
            table.add_row(path.name, str(path), "?", f"[red]{exc}[/]")
    console.print(table)


HF_REPO = "hugggof/vampnet"


def cmd_models_download(args: argparse.Namespace) -> None:
    try:
        from huggingface_hub import hf_hub_download
        from .convert.export import Sources, convert
    except ImportError as exc:
        raise UserError(f"downloading and converting needs the `convert` extra ({exc.name} is missing): "
                        "pip install 'rtvamp[convert]'") from None
    from .bundle import bundles_dir

    names = ["codec.pth", "coarse.pth", "c2f.pth"]
    if args.lora:
        names += [f"loras/{args.lora}/coarse.pth", f"loras/{args.lora}/c2f.pth"]
    files = {}
    for name in names:
        try:
            files[name] = Path(hf_hub_download(HF_REPO, name))
        except Exception as exc:  # offline, missing file, hub errors
            raise UserError(f"could not download {name} from the Hugging Face repo {HF_REPO}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                            "(offline? convert local files with `rtvamp models convert`)") from None
    coarse = files[f"loras/{args.lora}/coarse.pth"] if args.lora else files["coarse.pth"]
    c2f = files[f"loras/{args.lora}/c2f.pth"] if args.lora else files["c2f.pth"]
    default_name = "vampnet" + (f"-{args.lora}" if args.lora else "")
    out = Path(args.out) if args.out else bundles_dir() / default_name
    report = _convert_with_progress(convert, Sources(files["codec.pth"], coarse, c2f), out, args.precision)
    _print_report(report, out)
    print(out)


# -- entry ---------------------------------------------------------------------------------------


CONVERT_PRECISION_HELP = ("auto or int8 (default auto): fp32 transformers plus int8 variants with their measured "
                          "agreement (run on the CPU when eligible); fp32: fp32 only")


def _add_precision(parser: argparse.ArgumentParser, where: str = "") -> None:
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8"],
                        help="transformer precision: auto = int8 on the CPU when the bundle's int8 variants agree "
                        f"with fp32 (≥ 99 %% top-1), else fp32; int8 fails when they do not{where}")


def build_parser() -> argparse.ArgumentParser:
    from .masks import DEFAULT_PRESET, PRESETS
    from .vamp import STEP_PRESETS

    parser = argparse.ArgumentParser(prog="rtvamp", description="A real-time engine for VampNet.")
    parser.add_argument("--version", action="version", version=f"rtvamp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="a scripted headless performance through the engine → WAV + report PNG")
    demo.add_argument("-o", "--output", default="rtvamp-demo.wav")
    demo.add_argument("--bars", type=int, default=14, help="length of the render (≥ 13)")
    demo.add_argument("--bpm", type=float, default=120.0)
    demo.add_argument("--steps", default="balanced", choices=sorted(STEP_PRESETS))
    demo.add_argument("--variations", type=int, default=2)
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--bundle", help="bundle folder or installed name (default: embedded tiny)")
    _add_precision(demo)
    demo.set_defaults(func=cmd_demo)

    vamp = sub.add_parser("vamp", help="vamp an audio file (WAV/FLAC/…)")
    vamp.add_argument("input")
    vamp.add_argument("-o", "--output", required=True, help="output .wav or .flac (…_K for several variations)")
    vamp.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="mask preset")
    vamp.add_argument("--quality", default="quality", choices=sorted(STEP_PRESETS), help="step preset")
    vamp.add_argument("--steps", type=int, help="coarse steps (overrides --quality)")
    vamp.add_argument("--c2f-steps", type=int)
    vamp.add_argument("--temperature", type=float, default=1.0)
    vamp.add_argument("--top-p", type=float)
    vamp.add_argument("--seed", type=int, default=0)
    vamp.add_argument("--variations", type=int, default=1)
    vamp.add_argument("--max-seconds", type=float, default=120.0, help="refuse longer input")
    vamp.add_argument("--bundle", help="bundle folder or installed name (default: embedded tiny)")
    _add_precision(vamp)
    vamp.set_defaults(func=cmd_vamp)

    live = sub.add_parser("live", help="play the instrument: sound card in/out, keyboard control")
    live.add_argument("--input-device", help="index or part of the name (see `rtvamp devices`)")
    live.add_argument("--output-device", help="index or part of the name")
    live.add_argument("--rate", type=int, default=44100, help="device sample rate (the model rate is converted in the worker)")
    live.add_argument("--block", type=int, default=256, help="frames per audio callback")
    live.add_argument("--channels", type=int, default=2)
    live.add_argument("--bpm", type=float, default=120.0)
    live.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    live.add_argument("--steps", default="fast", choices=sorted(STEP_PRESETS))
    live.add_argument("--variations", type=int, default=2, help="candidates per vamp (n/p to audition)")
    live.add_argument("--crossfade-ms", type=float, default=20.0)
    live.add_argument("--dry", type=float, default=1.0, help="input monitoring level")
    live.add_argument("--record", help="record the session (input and output) into this folder")
    live.add_argument("--auto-every", type=int, help="vamp the loop automatically every K loops")
    live.add_argument("--loop", help="start with this audio file as the loop")
    live.add_argument("--duration", type=float, help="stop after this many seconds (headless)")
    live.add_argument("--midi", help="MIDI input port: index, part of the name, or virtual[:NAME]")
    live.add_argument("--midi-out", help="MIDI output port (pad lights; clock when rtvamp is the master)")
    live.add_argument("--midi-map", help="MIDI map TOML (default: the built-in 16-pad/8-knob map)")
    live.add_argument("--midi-clock", action="store_true", help="follow MIDI clock on --midi")
    live.add_argument("--midi-api", help="MIDI system: alsa, jack, … (default: rtmidi's choice)")
    live.add_argument("--bundle", help="bundle folder or installed name (default: embedded tiny)")
    live.add_argument("--backend", default="local", help="where vamps run: local, tcp://HOST:PORT (rtvamp "
                      "worker), ray, ray://HOST:PORT or http://HOST:PORT/rtvamp (rtvamp pool)")
    live.add_argument("--keys", help="CURVE keys folder for --backend tcp://… (default: the per-user one)")
    _add_precision(live, " (local worker; a remote worker or pool uses its own)")
    live.set_defaults(func=cmd_live)

    devices = sub.add_parser("devices", help="list audio devices")
    devices.set_defaults(func=cmd_devices)

    from .bridge.cli import register_cli as register_bridge

    register_bridge(sub, keys=True)  # serve, ctl, keys

    from .midi.cli import register_cli as register_midi

    register_midi(sub)  # midi ports, learn, monitor

    from .engine.remote_cli import register_cli as register_remote

    register_remote(sub, keys=False)  # worker, pool (the bridge's `keys` writes the same key files)

    models = sub.add_parser("models", help="convert, verify, list and download model bundles")
    msub = models.add_subparsers(dest="models_command", required=True)
    conv = msub.add_parser("convert", help="official checkpoints → bundle (needs the convert extra)")
    conv.add_argument("--codec", required=True)
    conv.add_argument("--coarse", required=True)
    conv.add_argument("--c2f", required=True)
    conv.add_argument("--lora-coarse", help="LoRA-only state dict applied over --coarse")
    conv.add_argument("--lora-c2f", help="LoRA-only state dict applied over --c2f")
    conv.add_argument("--out", required=True)
    conv.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8"], help=CONVERT_PRECISION_HELP)
    conv.set_defaults(func=cmd_models_convert)
    ver = msub.add_parser("verify", help="check a bundle's hashes, contract and a smoke forward")
    ver.add_argument("bundle", nargs="?", help="bundle folder or installed name (default: embedded tiny)")
    _add_precision(ver)
    ver.set_defaults(func=cmd_models_verify)
    lst = msub.add_parser("list", help="installed bundles")
    lst.set_defaults(func=cmd_models_list)
    dl = msub.add_parser("download", help=f"fetch the official weights ({HF_REPO}) and convert them")
    dl.add_argument("--lora", help="a fine-tune under loras/<name>/ (e.g. percussion, choir)")
    dl.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8"], help=CONVERT_PRECISION_HELP)
    dl.add_argument("--out", help="bundle folder (default: the per-user bundle folder)")
    dl.set_defaults(func=cmd_models_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .audio import AudioInputError
    from .bundle import BundleError
    from .engine.backend import WorkerError
    from .io.audio import DeviceError
    from .midi import MidiError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, BundleError, AudioInputError, DeviceError, WorkerError, MidiError, ValueError,
            OSError) as exc:
        console.print(f"[bold red]error[/]: {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
