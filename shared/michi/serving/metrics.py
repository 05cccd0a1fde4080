"""Prometheus metrics of the mesh (scraped from each stage's --metrics-port)."""
from prometheus_client import Counter, Gauge, Histogram

LIVE_SESSIONS = Gauge("michi_live_sessions", "calls open on this stage", ["stage"])
TICK_SECONDS = Histogram("michi_tick_seconds", "wall time of one tick on this stage", ["stage"],
                         buckets=(0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64))
BATCH_SIZE = Histogram("michi_backbone_batch_size", "calls in one backbone forward",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
MISSED_TICKS = Counter("michi_missed_tick_deadlines_total", "ticks that finished after their 80 ms slot")
FIRST_AUDIO_SECONDS = Histogram("michi_time_to_first_audio_seconds", "call start to first agent audio sent",
                                buckets=(0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56))
FAILOVERS = Counter("michi_stage_failovers_total", "calls moved to another stage replica", ["stage"])
CAPACITY = Gauge("michi_capacity_calls", "calls this stage admits at once (admission control)", ["stage"])
REFUSED_CALLS = Counter("michi_refused_calls_total", "calls refused at capacity (RESOURCE_EXHAUSTED)", ["stage"])
OPEN_ROWS = Gauge("michi_backbone_open_rows", "backbone engine rows held by calls (KV cache rows in use)")
STAGE_STUCK = Gauge("michi_stage_stuck", "1 while the stage's watchdog finds its work loop stuck", ["stage"])
