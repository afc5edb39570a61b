"""The streaming engine: sources, decoding, sinks and the consume loop."""

from __future__ import annotations

from streamlmm.stream.decode import Batch, DeadLetter, Decoder, Record
from streamlmm.stream.engine import Engine, EngineConfig
from streamlmm.stream.sources import JsonlSource, KafkaSource, Source, open_source

__all__ = [
    "Batch",
    "DeadLetter",
    "Decoder",
    "Record",
    "Engine",
    "EngineConfig",
    "JsonlSource",
    "KafkaSource",
    "Source",
    "open_source",
]
