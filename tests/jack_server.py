"""A private JACK server for tests: `jackd -d dummy` is a real audio server without sound hardware.

PortAudio enumerates its host APIs once, in Pa_Initialize, which sounddevice calls when it is
imported: a process that imported sounddevice before jackd was up does not see JACK. `jack_dummy`
therefore re-initialises PortAudio once the server answers (`sounddevice._terminate();
sounddevice._initialize()`), in this process, so the driver under test runs in the test process.
On exit it terminates PortAudio *before* stopping jackd — PortAudio's JACK host API asserts, and
aborts the whole process, if it is terminated after its server has gone — and then initialises
PortAudio again (now without JACK). Close every stream before the context exits.

The server runs under a unique name, exported as JACK_DEFAULT_SERVER while the context is open,
so it neither collides with nor uses a JACK server the user runs; child processes (jack_lsp,
jack_connect) inherit the name. Contexts nest: on exit PortAudio is re-initialised with the outer
server (if any) restored.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

JACK_HOSTAPI = "JACK Audio Connection Kit"
START_TIMEOUT_S = 10.0
_server_numbers = itertools.count()


def jack_ports() -> list[str]:
    """Port names on the running server (jack_lsp), in registration order."""
    proc = subprocess.run(["jack_lsp"], check=False, capture_output=True, text=True, timeout=5)
    return proc.stdout.split("\n")[:-1] if proc.returncode == 0 else []


def _wait_until_up(server: subprocess.Popen) -> bool:
    """True once jack_lsp lists the dummy's playback port; False if jackd exits or times out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and server.poll() is None:
        if "system:playback_1" in jack_ports():
            return True
        time.sleep(0.05)
    return False


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@contextmanager
def jack_dummy(rate: int = 44100, period: int = 256, ports: int = 2) -> Iterator[str]:
    """Run `jackd -d dummy -r rate -p period -C ports -P ports` (rate in Hz, period in frames,
    capture and playback ports) and make sounddevice see it; yields the server name. Tries real-time
    scheduling first, then `--no-realtime`.

    Skips the test when jackd, jack_lsp or PortAudio (with its JACK host API) is missing; fails it
    when jackd is installed but does not start within START_TIMEOUT_S.
    """
    missing = [tool for tool in ("jackd", "jack_lsp") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: apt-get install jackd2")
    try:
        import sounddevice
    except OSError as exc:
        pytest.skip(f"{exc}: apt-get install libportaudio2")

    name = f"rtvamp-test-{os.getpid()}-{next(_server_numbers)}"
    previous = os.environ.get("JACK_DEFAULT_SERVER")
    os.environ["JACK_DEFAULT_SERVER"] = name
    server = None
    with tempfile.TemporaryFile("w+") as log:
        try:
            # real-time at priority 80 (clients run at 75) where allowed: on this VM it cut the
            # dummy driver's own xruns about five-fold against the default priority 10
            for realtime_flags in (["--realtime", "-P", "80"], ["--no-realtime"]):
                server = subprocess.Popen(["jackd", "-n", name, *realtime_flags, "-d", "dummy", "-r", str(rate),
                                           "-p", str(period), "-C", str(ports), "-P", str(ports)],
                                          stdout=log, stderr=subprocess.STDOUT)
                if _wait_until_up(server):
                    break
                _stop(server)
                server = None
            if server is None:
                log.seek(0)
                pytest.fail(f"jackd -d dummy did not start within {START_TIMEOUT_S} s:\n{log.read()}")
            sounddevice._terminate()
            sounddevice._initialize()
            if JACK_HOSTAPI not in [api["name"] for api in sounddevice.query_hostapis()]:
                pytest.skip("this PortAudio has no JACK host API")
            yield name
        finally:
            if server is not None:
                sounddevice._terminate()
                _stop(server)
            if previous is None:
                del os.environ["JACK_DEFAULT_SERVER"]
            else:
                os.environ["JACK_DEFAULT_SERVER"] = previous
            if server is not None:
                sounddevice._initialize()
