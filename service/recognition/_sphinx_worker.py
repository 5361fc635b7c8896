"""Runs inside a pocketsphinx worker process: one decoder, one utterance at a time.

Pocketsphinx holds the GIL while it decodes, so decoding in a thread would stall the
event loop; each decoder therefore lives in its own process. This module imports only
pocketsphinx so that a spawned worker starts quickly.
"""

from __future__ import annotations

import signal

from pocketsphinx import Decoder

from firmware_protocol import SAMPLE_RATE

_decoder: Decoder | None = None
_in_utterance = False
_initial_cmn = ""


def init(jsgf: str | None) -> None:
    global _decoder, _initial_cmn
    # The bridge decides when its workers stop (after draining, on shutdown). Ctrl-C in a terminal
    # and service managers signal the whole process group; a worker killed then would fail the
    # utterances the bridge is still finishing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # No flat-lexicon second pass: end_utt drops from ~100-160 ms to ~20-30 ms on our
    # fixtures with the same transcripts, and the final is what the device waits for.
    _decoder = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL", fwdflat=False)
    _initial_cmn = _decoder.get_cmn()
    if jsgf:
        _decoder.add_jsgf_string("commands", jsgf)
        _decoder.activate_search("commands")


def ready() -> bool:
    return _decoder is not None


def process(pcm: bytes) -> str:
    """Decode more audio of the current utterance (starting one if needed); return the hypothesis."""
    global _in_utterance
    assert _decoder is not None
    if not _in_utterance:
        # Live CMN adapts to whoever spoke last; start every utterance from the model's
        # initial estimate so one device's audio never colours another's result.
        _decoder.set_cmn(_initial_cmn)
        _decoder.start_utt()
        _in_utterance = True
    if pcm:
        _decoder.process_raw(pcm, False, False)
    hyp = _decoder.hyp()
    return hyp.hypstr if hyp is not None else ""


def finish(pcm: bytes) -> str:
    global _in_utterance
    assert _decoder is not None
    process(pcm)
    _decoder.end_utt()
    _in_utterance = False
    hyp = _decoder.hyp()
    return hyp.hypstr if hyp is not None else ""


def abort() -> None:
    global _in_utterance
    if _decoder is not None and _in_utterance:
        _decoder.end_utt()
    _in_utterance = False
