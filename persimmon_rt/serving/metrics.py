"""The server's Prometheus metrics (text exposition format at GET /metrics).

Semantics:
    persimmon_rt_http_requests_total{endpoint,status}   HTTP requests answered, by route and the status code
                                                        sent (499: the client left before a non-streamed
                                                        answer; a streamed answer counts its 200 even if it
                                                        was cut short later)
    persimmon_rt_sequences_total{reason}                sequences (one per prompt and choice) that ended:
                                                        stop, length, cancelled (client gone, or shutdown),
                                                        error (a failed step)
    persimmon_rt_prompt_tokens_total                    prompt tokens of sequences accepted into the queue
    persimmon_rt_generation_tokens_total                tokens generated (stop tokens included)
    persimmon_rt_time_to_first_token_seconds            from the request's arrival to its first token leaving
                                                        the scheduler, per sequence
    persimmon_rt_inter_token_latency_seconds            between a sequence's consecutive tokens leaving the
                                                        scheduler
    persimmon_rt_request_duration_seconds               from arrival to the last token, per sequence
    persimmon_rt_queue_depth                            sequences waiting for a row, after the last boundary
    persimmon_rt_rows_in_use, persimmon_rt_rows         rows holding a sequence; rows in all
    persimmon_rt_step_failures_total                    scheduler steps that raised (their sequences failed)
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_FIRST = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DURATION = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """One registry per server; every metric is safe to update from the scheduler thread."""

    def __init__(self, rows: int):
        r = self.registry = CollectorRegistry()
        p = "persimmon_rt_"
        self.http_requests = Counter(p + "http_requests", "HTTP requests answered, by endpoint and status code",
                                     ["endpoint", "status"], registry=r)
        self.sequences = Counter(p + "sequences", "Sequences finished, by reason", ["reason"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of accepted sequences", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(p + "time_to_first_token_seconds", "Arrival to first token",
                                             buckets=_FIRST, registry=r)
        self.inter_token_latency = Histogram(p + "inter_token_latency_seconds", "Between consecutive tokens",
                                             buckets=_LATENCY, registry=r)
        self.request_duration = Histogram(p + "request_duration_seconds", "Arrival to last token, per sequence",
                                          buckets=_DURATION, registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Sequences waiting for a row", registry=r)
        self.rows_in_use = Gauge(p + "rows_in_use", "Rows holding a sequence", registry=r)
        self.rows = Gauge(p + "rows", "Rows (sequences decoded together at most)", registry=r)
        self.step_failures = Counter(p + "step_failures", "Scheduler steps that raised", registry=r)
        self.rows.set(rows)
        for reason in ("stop", "length", "cancelled", "error"):
            self.sequences.labels(reason)          # present from the start, at 0

    def render(self) -> bytes:
        return generate_latest(self.registry)
