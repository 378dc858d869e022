"""The generation worker: real worker processes, real ZeroMQ sockets, the embedded tiny bundle."""

from __future__ import annotations

import os
import signal
import time

import msgspec
import numpy as np
import pytest
import zmq

from rtvamp.engine.backend import JobResult, LocalWorker, WorkerError, WorkerLost
from rtvamp.engine.protocol import (PROTOCOL_VERSION, Cancel, Connect, Heartbeat, Hello, Job, Progress,
                                    ProtocolError, Result, Shutdown, WorkerInfo, decode_reply, decode_request,
                                    encode)

RATE = 44100
START_S = 180.0
"""generous: a worker recompiles its numba kernels when their cache is stale"""
FAST = dict(preset="medium-variation", coarse_steps=4, c2f_steps=1)
LONG = dict(preset="medium-variation", coarse_steps=400, c2f_steps=1)
"""tens of seconds of coarse steps: long enough to be cancelled or killed mid-job"""


def clip(seconds: float = 1.0, channels: int = 2, extra: int = 17) -> np.ndarray:
    """A two-tone clip, float32 [seconds·RATE + extra, channels]."""
    t = np.arange(int(seconds * RATE) + extra) / RATE
    tones = [0.3 * np.sin(2 * np.pi * f * t) for f in (220.0, 330.0)[:channels]]
    return np.stack(tones, axis=1).astype(np.float32)


def wait_for(worker: LocalWorker, job_ids: list[int], timeout_s: float = 60.0) -> list:
    """Every event until each of `job_ids` has its JobResult."""
    events, open_ids = [], set(job_ids)
    deadline = time.monotonic() + timeout_s
    while open_ids:
        assert time.monotonic() < deadline, f"no result for jobs {sorted(open_ids)} in {timeout_s} s"
        for event in worker.events(0.1):
            events.append(event)
            if isinstance(event, JobResult):
                open_ids.discard(event.job_id)
    return events


def result_of(events: list, job_id: int) -> JobResult:
    return next(e for e in events if isinstance(e, JobResult) and e.job_id == job_id)


def first_progress(worker: LocalWorker, job_id: int, timeout_s: float = 60.0) -> list:
    """Events until the job's first Progress (the job is running)."""
    events, deadline = [], time.monotonic() + timeout_s
    while not any(isinstance(e, Progress) and e.job_id == job_id for e in events):
        assert time.monotonic() < deadline, f"job {job_id} never started"
        events += worker.events(0.1)
    return events


@pytest.fixture(scope="module")
def worker():
    with LocalWorker(start_timeout_s=START_S) as w:
        yield w


# -- protocol --------------------------------------------------------------------------------

INFO = WorkerInfo(host="h", pid=7, bundle="tiny", providers=["CPUExecutionProvider"], max_batch=2,
                  step_seconds={"coarse/575": 0.1})
JOB = Job(job_id=3, n_samples=5, n_channels=2, sample_rate=48000, preset="medium-variation", coarse_steps=8,
          c2f_steps=2, temperature=0.9, seeds=[1, 2], top_p=0.8, beat_times_s=[0.0, 0.5], deadline_s=1.5,
          bundle="tiny")
OK = Result(job_id=3, status="ok", worker=INFO, n_candidates=2, n_samples=5, n_channels=2, sample_rate=48000,
            seconds={"coarse": 0.2})


@pytest.mark.parametrize("message", [Connect(protocol=PROTOCOL_VERSION, client="x"), Cancel(job_id=4), Shutdown()])
def test_requests_round_trip(message):
    assert decode_request(encode(message)) == (message, None)


@pytest.mark.parametrize("message", [Hello(protocol=PROTOCOL_VERSION, worker=INFO),
                                     Heartbeat(worker=INFO, queued=2, busy=True, malformed=1),
                                     Progress(job_id=1, stage="coarse", fraction=0.5),
                                     Result(job_id=1, status="failed", worker=INFO, error="the audio is silent")])
def test_replies_round_trip(message):
    decoded, audio = decode_reply(encode(message))
    assert decoded == message
    assert audio is None or audio.size == 0


def test_audio_frames_round_trip():
    audio = np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32)
    message, decoded = decode_request([bytes(f) for f in encode(JOB, audio)])
    assert message == JOB and np.array_equal(decoded, audio)
    candidates = np.stack([audio, -audio])
    message, decoded = decode_reply([bytes(f) for f in encode(OK, candidates)])
    assert message == OK and np.array_equal(decoded, candidates)


@pytest.mark.parametrize("frames,message", [
    ([], "empty message"),
    ([b"\xc1garbage"], "bad header"),
    ([msgspec.msgpack.encode([1, 2, 3])], "bad header"),
    ([msgspec.msgpack.encode({"type": "cancel", "job_id": "seven"})], "Expected `int`"),
    ([msgspec.msgpack.encode({"type": "teleport"})], "bad header"),
    ([encode(Hello(protocol=1, worker=INFO))[0]], "bad header"),  # a reply sent to the worker
    ([encode(JOB, np.zeros((5, 2), np.float32))[0]], "takes 2 frame(s), got 1"),
    ([bytes(f) for f in encode(JOB, np.zeros((5, 2), np.float32))] + [b""], "takes 2 frame(s), got 3"),
    ([encode(JOB, np.zeros((5, 2), np.float32))[0], b"\0" * 39], "39 bytes"),
    ([encode(Cancel(job_id=1))[0], b"audio?"], "takes 1 frame(s), got 2"),
])
def test_malformed_requests_raise_protocol_error(frames, message):
    with pytest.raises(ProtocolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode_request(frames)


def test_malformed_replies_raise_protocol_error():
    with pytest.raises(ProtocolError, match="bytes"):
        decode_reply([encode(OK, np.zeros((2, 5, 2), np.float32))[0], b"\0" * 8])
    failed_with_audio = msgspec.msgpack.encode({"type": "result", "job_id": 1, "status": "failed",
                                                "worker": msgspec.to_builtins(INFO), "n_candidates": 1,
                                                "n_samples": 1, "n_channels": 1})
    with pytest.raises(ProtocolError, match="carries no candidates"):
        decode_reply([failed_with_audio, b"\0" * 4])


def test_encode_refuses_what_the_receiver_would_refuse():
    with pytest.raises(ProtocolError, match="temperature"):
        encode(msgspec.structs.replace(JOB, temperature=0.0), np.zeros((5, 2), np.float32))
    with pytest.raises(ProtocolError, match=r"declares audio \(5, 2\)"):
        encode(JOB, np.zeros((4, 2), np.float32))
    with pytest.raises(ProtocolError, match="needs its audio"):
        encode(JOB)


# -- the worker process ------------------------------------------------------------------------

def test_job_round_trip_seeds_and_progress(worker):
    audio = clip(channels=2)
    first = worker.submit(audio, RATE, seeds=[5, 6], **FAST)
    again = worker.submit(audio, RATE, seeds=[5], **FAST)
    events = wait_for(worker, [first, again])
    a, b = result_of(events, first), result_of(events, again)
    assert a.status == "ok", a.error
    assert a.audio.shape == (2, audio.shape[0], 2) and a.audio.dtype == np.float32
    assert a.sample_rate == RATE and np.isfinite(a.audio).all()
    assert a.audio.flags.writeable and a.audio.flags.owndata, "result audio is copied out of the frame"
    assert np.array_equal(b.audio[0], a.audio[0]), "the same seed gives the same audio"
    assert not np.allclose(a.audio[0], a.audio[1]), "different seeds differ"
    assert a.latency_s > 0 and a.worker.pid == worker.process.pid
    assert {"queued", "coarse", "c2f", "decode"} <= set(a.seconds)
    progress = [e for e in events if isinstance(e, Progress) and e.job_id == first]
    assert progress, "progress events arrive"
    for stage in {p.stage for p in progress}:
        fractions = [p.fraction for p in progress if p.stage == stage]
        assert fractions == sorted(fractions), f"{stage} progress is monotone"
    assert {p.stage for p in progress} <= {"coarse", "c2f"}
    assert len(worker.latencies) >= 2 and worker.info.step_seconds


def test_cancel_running_job(worker):
    job_id = worker.submit(clip(), RATE, seeds=[1], **LONG)
    first_progress(worker, job_id)
    cancelled_at = time.monotonic()
    worker.cancel(job_id)
    result = result_of(wait_for(worker, [job_id], timeout_s=10.0), job_id)
    assert result.status == "cancelled" and result.audio.shape[0] == 0
    assert time.monotonic() - cancelled_at < 3.0


def test_deadline_cuts_a_long_job_short(worker):
    job_id = worker.submit(clip(), RATE, seeds=[1], deadline_s=1.0, **LONG)
    result = result_of(wait_for(worker, [job_id], timeout_s=20.0), job_id)
    assert result.status == "ok", result.error
    assert result.seconds["coarse"] < 3.0, "400 coarse steps end early at the deadline"


def test_jobs_run_in_order_and_queued_ones_cancel(worker):
    older = worker.submit(clip(), RATE, seeds=[1], preset="medium-variation", coarse_steps=16, c2f_steps=1)
    newer = worker.submit(clip(), RATE, seeds=[2], **FAST)
    dropped = worker.submit(clip(), RATE, seeds=[3], **FAST)
    worker.cancel(dropped)
    events = wait_for(worker, [older, newer, dropped])
    order = [e.job_id for e in events if isinstance(e, JobResult)]
    assert order == [dropped, older, newer]
    assert result_of(events, dropped).status == "cancelled"
    assert result_of(events, older).status == result_of(events, newer).status == "ok"
    assert result_of(events, newer).seconds["queued"] > result_of(events, older).seconds["coarse"]
    first_newer = next(i for i, e in enumerate(events) if isinstance(e, Progress) and e.job_id == newer)
    assert all(not (isinstance(e, Progress) and e.job_id == older) for e in events[first_newer:])


@pytest.mark.parametrize("audio,settings,message", [
    (np.zeros((RATE, 1), np.float32), FAST, "silent"),
    (clip(), dict(FAST, preset="no-such-preset"), "unknown mask preset"),
    (clip(), FAST | {"bundle": "another"}, "serves bundle 'tiny'"),
])
def test_bad_job_fails_and_the_worker_keeps_serving(worker, audio, settings, message):
    bad = worker.submit(audio, RATE, seeds=[1], **settings)
    good = worker.submit(clip(0.5), RATE, seeds=[1], **FAST)
    events = wait_for(worker, [bad, good])
    failed = result_of(events, bad)
    assert failed.status == "failed" and message in failed.error
    assert result_of(events, good).status == "ok"


def test_too_many_candidates_fail_with_a_message(worker):
    job_id = worker.submit(clip(0.5), RATE, seeds=[1, 2, 3], **FAST)
    result = result_of(wait_for(worker, [job_id]), job_id)
    assert result.status == "failed" and "3 candidates" in result.error


def test_malformed_messages_are_dropped(worker):
    context = zmq.Context.instance()
    raw = context.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(worker.endpoint)
    header = encode(msgspec.structs.replace(JOB, n_samples=RATE, n_channels=1), np.zeros((RATE, 1), np.float32))[0]
    for frames in ([b"garbage"], [b""], [header], [header, b"\0" * 100], [header, b"\0" * (4 * RATE), b"x"],
                   encode(Hello(protocol=PROTOCOL_VERSION, worker=INFO))):
        raw.send_multipart(frames)
    raw.send_multipart(encode(Connect(protocol=PROTOCOL_VERSION, client="raw")))
    try:
        malformed, deadline = None, time.monotonic() + 10.0
        while malformed is None:
            assert raw.poll(int(1000 * (deadline - time.monotonic()))), "the worker stopped answering"
            message, _ = decode_reply(raw.recv_multipart())
            if isinstance(message, Heartbeat):
                malformed = message.malformed
    finally:
        raw.close()
    assert malformed >= 6
    job_id = worker.submit(clip(0.5), RATE, seeds=[1], **FAST)
    assert result_of(wait_for(worker, [job_id]), job_id).status == "ok"


def test_lost_workers_are_reported_and_replaced_and_close_cleans_up():
    worker = LocalWorker(start_timeout_s=START_S)
    worker.start()
    first_pid, folder = worker.process.pid, os.path.dirname(worker.endpoint.removeprefix("ipc://"))
    job_id = worker.submit(clip(), RATE, seeds=[1], **LONG)
    events = first_progress(worker, job_id)
    os.kill(first_pid, signal.SIGKILL)
    events += wait_for(worker, [job_id], timeout_s=10.0)
    lost = [e for e in events if isinstance(e, WorkerLost)]
    assert len(lost) == 1 and "signal 9" in lost[0].reason
    failed = result_of(events, job_id)
    assert failed.status == "failed" and failed.error.startswith("worker lost:")
    assert worker.restarts == 1 and worker.process.pid != first_pid
    next_job = worker.submit(clip(0.5), RATE, seeds=[1], **FAST)  # waits for the new worker to start
    events = wait_for(worker, [next_job], timeout_s=START_S)
    assert result_of(events, next_job).status == "ok"
    assert not any(isinstance(e, WorkerLost) for e in events)
    second_pid = worker.process.pid
    os.kill(second_pid, signal.SIGSTOP)  # alive, but silent
    events, deadline = [], time.monotonic() + 10.0
    while not events:
        assert time.monotonic() < deadline, "a silent worker is never declared lost"
        events = worker.events(0.1)
    assert isinstance(events[0], WorkerLost) and "no word from the worker" in events[0].reason
    assert worker.restarts == 2
    third_pid = worker.process.pid
    worker.close()  # while the third worker is still starting
    for pid in (first_pid, second_pid, third_pid):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not os.path.exists(folder)


def test_a_worker_that_cannot_start_is_an_error(tmp_path):
    worker = LocalWorker(bundle=str(tmp_path / "missing"))
    with pytest.raises(WorkerError, match="exited with code 2"):
        worker.start()
    worker.close()
    with pytest.raises(WorkerError, match="start"):
        worker.submit(clip(), RATE, seeds=[1], **FAST)
