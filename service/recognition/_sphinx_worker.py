"""Runs inside a pocketsphinx worker process (:mod:`service.recognition.workers`): one decoder.

Pocketsphinx holds the GIL while it decodes, so decoding in a thread would stall the
event loop; each decoder therefore lives in its own process. This module imports only
pocketsphinx so that a spawned worker starts quickly.

A session may lose its decoder mid-utterance (it went quiet while others waited) and get
another later: ``fresh`` then starts its utterance over on this decoder, dropping whatever
half-decoded utterance the previous session left behind.
"""

from __future__ import annotations

from pocketsphinx import Decoder

from firmware_protocol import SAMPLE_RATE

_decoder: Decoder | None = None
_in_utterance = False
_initial_cmn = ""


def init(jsgf: str | None) -> None:
    global _decoder, _initial_cmn
    # No flat-lexicon second pass: end_utt drops from ~100-160 ms to ~20-30 ms on our
    # fixtures with the same transcripts, and the final is what the device waits for.
    _decoder = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL", fwdflat=False)
    _initial_cmn = _decoder.get_cmn()
    if jsgf:
        _decoder.add_jsgf_string("commands", jsgf)
        _decoder.activate_search("commands")


def process(pcm: bytes, fresh: bool) -> str:
    """Decode more audio of the current utterance (a new one if ``fresh``); return the hypothesis."""
    global _in_utterance
    assert _decoder is not None
    if fresh and _in_utterance:
        _decoder.end_utt()
        _in_utterance = False
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


def finish(pcm: bytes, fresh: bool) -> str:
    global _in_utterance
    assert _decoder is not None
    process(pcm, fresh)
    _decoder.end_utt()
    _in_utterance = False
    hyp = _decoder.hyp()
    return hyp.hypstr if hyp is not None else ""
