"""A hostile fleet against a real bridge: a 10x-capacity flood, then a distinct-id churn, and the recovery.

One run, one private Mosquitto (loopback, free port), one ``echokit-bridge run`` process with a
generated config (``session.max_sessions``, the embedded pocketsphinx backend or ``--backend openai``
against the loopback fake, JSON log, metrics on a free port), and these load processes:

1. **flood** (``--seconds``): ``--devices`` flooding devices (default 1000 = 10x ``--max-sessions``
   100), each doing push-to-talk utterances back to back (``bench/_flood_fleet.py``, the
   pre-framed generator of ``bench/bridge_throughput.py``), then ``--after`` seconds of quiet.
2. **churn**: ``--churn`` distinct device ids sending one malformed frame each, as fast as one
   raw MQTT connection takes them (``bench/_flood_churn.py``; ``--churn-rate`` paces it), until
   the bridge has read them all, then ``--after`` seconds of quiet.

All along, one **good device** (``bench/_flood_good.py``, a process of its own) does real
push-to-talk utterances and times LAST frame → final; the bridge's ``VmRSS`` and the latency of
``GET /healthz`` and ``GET /metrics`` are sampled every 100 ms. The table shows, per phase, RSS,
endpoint latency, the good device's finals and latency, what the flooders got, the bridge's
counter deltas and its log (lines that are not JSON included). At the end the bridge gets SIGTERM;
its child processes (decoder workers, multiprocessing's resource tracker) still running 10 s after
it exited are listed, then killed by pid. Nothing is asserted.

    .venv/bin/python bench/flood.py                                      # full size: about 3 minutes
    .venv/bin/python bench/flood.py --devices 300 --seconds 20 --churn 20000 --json bench/results/flood.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from _flood_probes import BridgeUnderTest, Probes, alive, descendants, scrape  # noqa: E402
from bridge_throughput import Child, generator_slices, git_describe, percentiles  # noqa: E402

HERE = Path(__file__).resolve().parent
PREFIX = "flood"
SETTLE_S = 3.0
"""Quiet time after the bridge connected, before the baseline RSS."""
CHURN_DRAIN_MAX_S = 120.0
"""How long the bridge may take to read the churn after it was sent."""
CHURN_COUNTER = 'echokit_bridge_messages_rejected_total{code="malformed_frame"}'
"""Moved by the churn's frames only (the good device sends none): the bridge has read them all once it stops."""


@dataclass
class Phase:
    name: str
    t0: float
    t1: float
    counters_before: dict[str, float]
    counters_after: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


# Configuration --------------------------------------------------------------------------------------


def bridge_config(args: argparse.Namespace, broker_url: str, openai_port: int | None) -> str:
    if openai_port is None:
        asr = f'platform = "pocketsphinx"\ndecoders = {args.decoders}'
    else:
        asr = (
            f'platform = "whisper"\nurl = "http://127.0.0.1:{openai_port}/v1/audio/transcriptions"\n'
            'api_key = "sk-bench"\nmodel = "whisper-1"\ntimeout_s = 10\nmax_retries = 1'
        )
    return (
        f'[mqtt]\nurl = "{broker_url}"\ntopic_prefix = "{PREFIX}"\n\n'
        f"[session]\nmax_sessions = {args.max_sessions}\n\n"
        f"[asr]\n{asr}\n\n"
        '[log]\nlevel = "info"\nformat = "json"\n\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n'
    )


def start_fake_openai(latency_ms: float, logdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``bench/_fake_openai_proc.py``: prints ``PORT <n>``, serves until its stdin closes."""
    process = subprocess.Popen(
        [sys.executable, str(HERE / "_fake_openai_proc.py"), "--latency-ms", str(latency_ms)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(logdir / "fake-openai.log").open("wb"),
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()  # bounded: the fake prints its port first, or exits
    if not line.startswith("PORT "):
        process.kill()
        raise RuntimeError(f"fake OpenAI did not start; see {logdir / 'fake-openai.log'}")
    return process, int(line.split()[1])


# Phases ------------------------------------------------------------------------------------------------


def run_flood(args: argparse.Namespace, broker: Any, logdir: Path, port: int) -> tuple[list[Phase], dict[str, Any]]:
    gens = []
    for g, (first, count) in enumerate(generator_slices(args.devices, args.generators)):
        spec = {
            "phase": "flood",
            "mode": "push_to_talk",
            "host": broker.host,
            "port": broker.port,
            "prefix": PREFIX,
            "first": first,
            "count": count,
            "seed": args.seed + g,
            "final_timeout": args.flood_final_timeout,
        }
        gens.append(Child(f"flood-gen{g}", [sys.executable, str(HERE / "_flood_fleet.py"), json.dumps(spec)], logdir))
    try:
        ready = [g.expect("ready", 120) for g in gens]
        before = scrape(port)
        t0 = time.monotonic() + 0.5
        grace = min(args.flood_final_timeout, 5.0) + 0.5
        go = {"t0": t0, "w0": t0, "w1": t0 + args.seconds, "t_end": t0 + args.seconds, "grace": grace}
        for g in gens:
            g.send(json.dumps(go))
        results = [g.expect("result", args.seconds + grace + 60) for g in gens]
        t1 = time.monotonic()
    finally:
        for g in gens:
            g.finish()
    at_end = scrape(port)
    time.sleep(args.after)
    t2, after = time.monotonic(), scrape(port)
    fleet = _fleet_summary(results)
    fleet["connect_s"] = max(r["connect_s"] for r in ready)
    return [Phase("flood", t0, t1, before, at_end), Phase("flood recovery", t1, t2, at_end, after)], fleet


def _fleet_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"devices": sum(r["devices"] for r in results), "errors": {}, "received": {}}
    for key in ("sent_total", "utterances_started", "utterances_completed", "timeouts", "disconnects"):
        out[key] = sum(r[key] for r in results)
    for r in results:
        for group in ("errors", "received"):
            for k, v in r[group].items():
                out[group][k] = out[group].get(k, 0) + v
    out["messages_received"] = sum(out["received"].values())
    return out


def run_churn(args: argparse.Namespace, broker: Any, logdir: Path, port: int) -> tuple[list[Phase], dict[str, Any]]:
    before = scrape(port)
    t0 = time.monotonic()
    spec = {
        "host": broker.host,
        "port": broker.port,
        "prefix": PREFIX,
        "count": args.churn,
        "rate": args.churn_rate,
        "max_s": args.churn_max_s,
    }
    churn = Child("churn", [sys.executable, str(HERE / "_flood_churn.py"), json.dumps(spec)], logdir)
    try:
        sent = churn.expect("result", args.churn_max_s + 30)
    finally:
        churn.finish()
    t1 = wait_until_read(port, CHURN_COUNTER)
    at_end = scrape(port)
    time.sleep(args.after)
    t2, after = time.monotonic(), scrape(port)
    read = at_end.get(CHURN_COUNTER, 0) - before.get(CHURN_COUNTER, 0)
    summary = {**sent, "bridge_read": read, "bridge_read_s": t1 - t0}
    return [Phase("churn", t0, t1, before, at_end), Phase("churn recovery", t1, t2, at_end, after)], summary


def wait_until_read(port: int, counter: str, quiet_s: float = 2.0) -> float:
    """When ``counter`` stopped moving for ``quiet_s`` (the bridge has read its backlog); bounded."""
    deadline = time.monotonic() + CHURN_DRAIN_MAX_S
    last, since = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        value = scrape(port).get(counter, 0.0)
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return since
        time.sleep(0.5)
    return time.monotonic()


# The run ---------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    from service.tools.devbroker import PrivateMosquitto

    result: dict[str, Any] = {}
    fake, openai_port = None, None
    with PrivateMosquitto() as broker:
        if args.backend == "openai":
            fake, openai_port = start_fake_openai(args.openai_latency_ms, logdir)
        bridge = BridgeUnderTest(bridge_config(args, broker.url, openai_port), logdir)
        good = None
        try:
            port = bridge.start()
            probes = Probes(bridge.pid, port)
            probes.start()
            time.sleep(SETTLE_S)
            result["rss_baseline_mb"] = probes.rss_now_kb() / 1024
            good = start_good_device(args, broker, logdir)
            phases: list[Phase] = []
            if args.devices:
                flood_phases, result["flood"] = run_flood(args, broker, logdir, port)
                phases += flood_phases
            if args.churn:
                churn_phases, result["churn"] = run_churn(args, broker, logdir, port)
                phases += churn_phases
            good.send("stop")
            utterances = good.expect("result", args.good_final_timeout + 30)["utterances"]
            probes.children |= descendants(bridge.pid)
            probes.stop()
        finally:
            if good is not None:
                good.finish()
            result["bridge_exit"] = bridge.stop()
            if fake is not None:
                fake.communicate(timeout=10)  # closes its stdin: it stops
        result["bridge_children"], result["left_behind"] = len(probes.children), reap(probes.children)
        result["bridge_log"] = bridge.log_summary()
    result["phases"] = [phase_report(p, probes, utterances) for p in phases]
    result["good_device"] = good_summary(utterances)
    return result


def reap(children: set[int], wait_s: float = 10.0) -> list[str]:
    """The bridge's child processes still running ``wait_s`` after it exited; killed (by pid) so none leaks."""
    deadline = time.monotonic() + wait_s
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = []
    for pid in sorted(alive(children)):
        try:
            left.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


def start_good_device(args: argparse.Namespace, broker: Any, logdir: Path) -> Child:
    spec = {
        "host": broker.host,
        "port": broker.port,
        "prefix": PREFIX,
        "device_id": "gooddevice",
        "seed": args.seed,
        "final_timeout": args.good_final_timeout,
    }
    good = Child("good", [sys.executable, str(HERE / "_flood_good.py"), json.dumps(spec)], logdir)
    good.expect("ready", 60)
    budget = args.seconds + args.churn_max_s + CHURN_DRAIN_MAX_S + 2 * args.after + 300
    good.send(json.dumps({"t_end": time.monotonic() + budget}))
    return good


# Reporting ----------------------------------------------------------------------------------------------------


def _between(samples: list[Any], t0: float, t1: float) -> list[Any]:
    return [s for s in samples if t0 <= s[0] < t1]


def phase_report(phase: Phase, probes: Probes, utterances: list[dict[str, Any]]) -> dict[str, Any]:
    rss = [kb for _, kb in _between(probes.rss, phase.t0, phase.t1)]
    endpoints = {}
    for path, samples in probes.requests.items():
        inside = _between(samples, phase.t0, phase.t1)
        endpoints[path] = {
            **percentiles([1000 * s for _, s, status in inside if status]),
            "requests": len(inside),
            "failed": sum(1 for *_, status in inside if status != 200),
        }
    gauges: dict[str, float] = {}
    for _, values in _between(probes.gauges, phase.t0, phase.t1):
        for name, v in values.items():
            gauges[name] = max(gauges.get(name, 0.0), v)
    inside_u = [u for u in utterances if phase.t0 <= u["t_last"] < phase.t1]
    return {
        "name": phase.name,
        "seconds": phase.t1 - phase.t0,
        "rss_mb": {
            "start": rss[0] / 1024 if rss else None,
            "peak": max(rss) / 1024 if rss else None,
            "end": rss[-1] / 1024 if rss else None,
        },
        "endpoints_ms": endpoints,
        "gauges_peak": gauges,
        "good_device": good_summary(inside_u),
        "loop_lag": loop_lag(phase.counters_before, phase.counters_after),
        "counter_deltas": counter_deltas(phase.counters_before, phase.counters_after),
        "gauges_end": {k: v for k, v in phase.counters_after.items() if k.split("{")[0] in GAUGES_AT_END},
    }


GAUGES_AT_END = ("echokit_bridge_devices", "echokit_bridge_sessions_active", "echokit_bridge_audio_queue_frames")


def loop_lag(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """The bridge's own event-loop lag histogram over the phase: mean, and the share of wake-ups over 100 ms."""
    name = "echokit_bridge_event_loop_lag_seconds"

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    count = delta(f"{name}_count")
    if not count:
        return {"mean_ms": None, "over_100ms": None}
    within = delta(f'{name}_bucket{{le="0.1"}}')
    return {"mean_ms": 1000 * delta(f"{name}_sum") / count, "over_100ms": 1 - within / count}


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Every ``*_total`` sample (our counters, by label) that moved, but the GC's."""
    out = {}
    for key, value in after.items():
        name = key.split("{")[0]
        if name.endswith("_total") and not name.startswith("python_gc") and value != before.get(key, 0.0):
            out[key] = value - before.get(key, 0.0)
    return out


def good_summary(utterances: list[dict[str, Any]]) -> dict[str, Any]:
    outcomes: dict[str, int] = {}
    for u in utterances:
        outcomes[u["outcome"]] = outcomes.get(u["outcome"], 0) + 1
    latencies = [u["latency_ms"] for u in utterances if u["outcome"] == "final"]
    return {"utterances": len(utterances), "outcomes": outcomes, "final_latency_ms": percentiles(latencies)}


def _ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.0f}" if value >= 10 else f"{value:.1f}")


def summarize(result: dict[str, Any]) -> str:
    cfg, phases = result["config"], result["phases"]
    lines = [
        "",
        f"EchoKit bridge under a hostile fleet: flood {cfg['devices']} devices x {cfg['seconds']:g} s "
        f"(max_sessions {cfg['max_sessions']}, backend {cfg['backend']}), churn {cfg['churn']} ids, "
        f"{cfg['after']:g} s quiet after each",
        f"machine: {result['env']['cpus']} CPUs, load average before {result['env']['loadavg_before']}; "
        f"code {result['env']['git']}",
        "",
        f"{'':34}" + "".join(f"{p['name']:>21}" for p in phases),
    ]

    def row(label: str, fn: Any) -> None:
        lines.append(f"{label:34}" + "".join(f"{fn(p):>21}" for p in phases))

    row("seconds", lambda p: f"{p['seconds']:.1f}")
    row("bridge RSS start/peak/end (MB)", lambda p: "/".join(_ms(p["rss_mb"][k]) for k in ("start", "peak", "end")))
    for path in ("/healthz", "/metrics"):
        row(f"{path} p50/p99/max (ms)", lambda p, q=path: _endpoint(p["endpoints_ms"][q]))
        row(
            f"{path} failed / requests",
            lambda p, q=path: f"{p['endpoints_ms'][q]['failed']}/{p['endpoints_ms'][q]['requests']}",
        )
    row(
        "good: finals / utterances",
        lambda p: f"{p['good_device']['outcomes'].get('final', 0)}/{p['good_device']['utterances']}",
    )
    row("good: LAST → final p50/p99 (ms)", lambda p: _pair(p["good_device"]["final_latency_ms"]))
    row("good: other outcomes", lambda p: _outcomes(p["good_device"]["outcomes"]))
    row("loop lag mean (ms) / over 100 ms", lambda p: _lag(p["loop_lag"]))
    row("peak devices / sessions_active", lambda p: _peaks(p["gauges_peak"]))
    lines += _headline(result)
    for p in phases:
        deltas = p["counter_deltas"]
        lines.append(f"\ncounters moved during {p['name']}:")
        lines += [f"  {k} +{v:g}" for k, v in sorted(deltas.items())] or ["  (none)"]
    lines.append(
        f"\nbridge child processes: {result['bridge_children']}; still running 10 s after the bridge exited "
        f"(exit code {result['bridge_exit']}): {len(result['left_behind'])}"
        + "".join(f"\n  {cmd}" for cmd in result["left_behind"])
    )
    log = result["bridge_log"]
    lines.append(
        f"\nbridge log: {log['lines']} lines, {log['non_json']} not JSON; levels {log['levels']}; "
        f"top events {log['events']}"
    )
    return "\n".join(lines)


def _endpoint(e: dict[str, Any]) -> str:
    return f"{_ms(e['p50'])}/{_ms(e['p99'])}/{_ms(e['max'])}"


def _pair(p: dict[str, Any]) -> str:
    return f"{_ms(p['p50'])}/{_ms(p['p99'])}"


def _outcomes(outcomes: dict[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in outcomes.items() if k != "final") or "none"


def _lag(lag: dict[str, float | None]) -> str:
    over = lag["over_100ms"]
    return f"{_ms(lag['mean_ms'])} / {'-' if over is None else f'{100 * over:.1f} %'}"


def _peaks(g: dict[str, float]) -> str:
    return f"{g.get('echokit_bridge_devices', 0):.0f}/{g.get('echokit_bridge_sessions_active', 0):.0f}"


def _headline(result: dict[str, Any]) -> list[str]:
    lines = [""]
    by_name = {p["name"]: p for p in result["phases"]}
    for attack in ("flood", "churn"):
        if attack not in by_name:
            continue
        during, recovery = by_name[attack], by_name[f"{attack} recovery"]
        peak = max(during["rss_mb"]["peak"] or 0, recovery["rss_mb"]["peak"] or 0)
        lines.append(
            f"{attack}: RSS before {_ms(during['rss_mb']['start'])} MB, peak {_ms(peak)} MB, "
            f"after {_ms(recovery['rss_mb']['end'])} MB (baseline {_ms(result['rss_baseline_mb'])} MB)"
        )
    if "flood" in result:
        f = result["flood"]
        lines.append(
            f"flooders: {f['devices']} devices sent {f['sent_total']} frames, {f['utterances_started']} utterances, "
            f"{f['utterances_completed']} finals, {f['timeouts']} timeouts, errors {f['errors'] or 'none'}; "
            f"{f['messages_received']} messages received {f['received']}"
        )
    if "churn" in result:
        c = result["churn"]
        lines.append(
            f"churn: {c['sent']} ids sent in {c['send_s']:.1f} s; the bridge read {c['bridge_read']:.0f} messages "
            f"in {c['bridge_read_s']:.1f} s (as malformed_frame)"
        )
    return lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Flood and churn a real bridge; RSS, health and a good device's finals."
    )
    parser.add_argument("--devices", type=int, default=1000, help="flooding devices (default 1000; 0: no flood)")
    parser.add_argument("--seconds", type=float, default=60.0, help="flood duration (default 60)")
    parser.add_argument("--max-sessions", type=int, default=100, help="the bridge's session.max_sessions (default 100)")
    parser.add_argument("--churn", type=int, default=100_000, help="distinct ids, one bad frame each (0: no churn)")
    parser.add_argument("--churn-rate", type=float, default=0, help="churn frames/s (default 0: as fast as possible)")
    parser.add_argument("--churn-max-s", type=float, default=120.0, help="stop sending the churn after this long")
    parser.add_argument("--after", type=float, default=15.0, help="quiet seconds after each attack (default 15)")
    parser.add_argument("--backend", choices=["pocketsphinx", "openai"], default="pocketsphinx")
    parser.add_argument("--decoders", type=int, default=2, help="pocketsphinx decoders (default 2)")
    parser.add_argument("--openai-latency-ms", type=float, default=300, help="the fake's answer time (default 300)")
    parser.add_argument("--generators", type=int, default=0, help="flood processes (default 1 per 150 devices)")
    parser.add_argument(
        "--flood-final-timeout", type=float, default=3.0, help="a flooder's wait for its final before it starts over"
    )
    parser.add_argument("--good-final-timeout", type=float, default=60.0, help="the good device's wait for a final")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", metavar="PATH", help="write every number measured as JSON")
    parser.add_argument("--keep-logs", action="store_true", help="keep the bridge's and children's logs")
    args = parser.parse_args(argv)
    if args.devices < 0 or args.churn < 0 or args.seconds <= 1 or args.max_sessions < 1:
        parser.error("--devices and --churn must be ≥ 0, --seconds > 1, --max-sessions ≥ 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logdir = Path(tempfile.mkdtemp(prefix="echokit-flood-"))
    env = {
        "cpus": os.cpu_count(),
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "git": git_describe(),
    }
    config = {k: v for k, v in vars(args).items() if k not in ("json", "keep_logs")}
    config["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"flood run, logs in {logdir} ...", flush=True)
    result = {"config": config, "env": env, **run(args, logdir)}
    print(summarize(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path}")
    if not args.keep_logs:
        for log in logdir.iterdir():
            log.unlink()
        logdir.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
