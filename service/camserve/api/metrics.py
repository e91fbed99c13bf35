"""Prometheus metrics, one registry per app so several apps can live in one process (tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Request, queue, batch, compute and model-load metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "camserve_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "camserve_request_duration_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("camserve_queue_depth", "images waiting in the model's queue", ["model"], registry=r)
        self.pending_forwards = Gauge(
            "camserve_pending_forwards",
            "forward-equivalents of the work queued or computing for the model (a backward counts as two): Score-CAM "
            "of one image weighs its layer's channel count, a prediction one",
            ["model"],
            registry=r,
        )
        self.inflight_images = Gauge(
            "camserve_inflight_images", "images in the model's batch being computed now", ["model"], registry=r
        )
        self.batch_size = Histogram(
            "camserve_batch_size", "images per engine batch", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_items = Counter(
            "camserve_inference_items_total",
            "images computed (divide by executions for the mean batch size)",
            ["model"],
            registry=r,
        )
        self.inference_executions = Counter(
            "camserve_inference_executions_total", "engine batches executed", ["model"], registry=r
        )
        self.compute_seconds = Histogram(
            "camserve_compute_seconds", "engine time per batch", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.model_load_seconds = Gauge(
            "camserve_model_load_seconds", "time to load and warm up each model", ["model"], registry=r
        )
        self.ready = Gauge("camserve_ready", "1 when all models are loaded and the service accepts work", registry=r)

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.inference_items.labels(model).inc(size)
        self.inference_executions.labels(model).inc()
        self.compute_seconds.labels(model).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
