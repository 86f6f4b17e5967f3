"""The service's Prometheus metrics, in a registry of its own (one per app, none global)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Seconds: a warm query of the tiny test model takes ~10 ms, of MERT-v1-95M on a CPU
# seconds, of a long clip on a busy GPU server tens of seconds.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
STAGES = ("decode", "embed", "search")


class Metrics:
    """Requests by endpoint and status, latencies per stage, clip seconds, the live index."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "mert_search_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "mert_search_request_seconds",
            "Wall time of a request, body upload included",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "mert_search_stage_seconds",
            "Wall time of each stage of an identification",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.clip_seconds = Counter(
            "mert_search_clip_seconds", "Seconds of audio identified", registry=r
        )
        self.in_flight = Gauge(
            "mert_search_identify_in_flight", "Identifications running or waiting", registry=r
        )
        self.generation = Gauge(
            "mert_search_index_generation", "Number of the live index generation", registry=r
        )
        self.windows = Gauge("mert_search_index_windows", "Windows in the live index", registry=r)
        self.tracks = Gauge("mert_search_index_tracks", "Tracks in the live index", registry=r)
        self.index_bytes = Gauge(
            "mert_search_index_bytes", "Bytes of the live generation's files", registry=r
        )
        self.generations_held = Gauge(
            "mert_search_generations_held",
            "Index generations loaded: the live one, and old ones queries still use",
            registry=r,
        )
        self.swaps = Counter("mert_search_index_swaps", "Index generations swapped in", registry=r)
        self.ready = Gauge("mert_search_ready", "1 when /readyz answers ready", registry=r)
        for stage in STAGES:  # every series exists from the start
            self.stage.labels(stage)

    def observe_stages(self, decode: float, embed: float, search: float) -> None:
        self.stage.labels("decode").observe(decode)
        self.stage.labels("embed").observe(embed)
        self.stage.labels("search").observe(search)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the text exposition format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
