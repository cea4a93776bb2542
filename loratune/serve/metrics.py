"""/metrics: the server's state in Prometheus' text exposition format (the names vLLM's users scrape have the
same shape: gauges for now, counters with ``_total``)."""

from __future__ import annotations


def prometheus_text(counts: dict[str, int], adapters: int) -> str:
    """The worker's :meth:`~loratune.serve.worker.Worker.counts` and the number of adapters held, as text."""
    gauges = [("requests_running", "requests being decoded", counts["running"]),
              ("requests_waiting", "requests waiting for a slot (queued or being prefilled)", counts["waiting"]),
              ("kv_slots_free", "KV-cache slots free", counts["slots_free"]),
              ("kv_slots", "KV-cache slots", counts["slots"]),
              ("streams_open", "requests whose answers are on their way", counts["streams"]),
              ("adapters_loaded", "adapters held", adapters)]
    counters = [("generation_tokens", "tokens generated", counts["generated"]),
                ("requests_finished", "requests that ran to a stop or their length", counts["completed"])]
    lines = []
    for kind, items, suffix in (("gauge", gauges, ""), ("counter", counters, "_total")):
        for name, text, value in items:
            lines += [f"# HELP loratune_{name}{suffix} {text}", f"# TYPE loratune_{name}{suffix} {kind}",
                      f"loratune_{name}{suffix} {value}"]
    return "\n".join(lines) + "\n"
