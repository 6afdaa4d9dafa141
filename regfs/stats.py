"""Counters of one process: what was fetched, served and failed, and how fast each remote answered.

One `Stats` per process, updated from FUSE threads and fetches; `snapshot()` gives a plain dict
(JSON-ready) for `regfs stats`. Remotes are named by their name and URL only, never with options,
so no credential can leak through it.
"""

import threading
import time


class Stats:
    def __init__(self):
        self._lock = threading.Lock()
        self._started = time.time()
        self._counts = {"objects_fetched": 0, "bytes_fetched": 0, "cache_hits": 0, "cache_misses": 0,
                        "readahead_fetches": 0, "fetched_with_size": 0, "bytes_served": 0, "reads": 0,
                        "errors": 0}
        self._remotes: dict[str, dict] = {}

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def served(self, size: int) -> None:
        """One read answered with `size` bytes (the FUSE read path: one lock, not two)."""
        with self._lock:
            self._counts["reads"] += 1
            self._counts["bytes_served"] += size

    def fetched(self, remote: str, size: int, seconds: float) -> None:
        with self._lock:
            self._counts["objects_fetched"] += 1
            self._counts["bytes_fetched"] += size
            entry = self._remotes.setdefault(remote, {"fetches": 0, "bytes": 0, "seconds": 0.0,
                                                      "max_seconds": 0.0, "errors": 0})
            entry["fetches"] += 1
            entry["bytes"] += size
            entry["seconds"] += seconds
            entry["max_seconds"] = max(entry["max_seconds"], seconds)

    def remote_failed(self, remote: str) -> None:
        with self._lock:
            entry = self._remotes.setdefault(remote, {"fetches": 0, "bytes": 0, "seconds": 0.0,
                                                      "max_seconds": 0.0, "errors": 0})
            entry["errors"] += 1

    def snapshot(self) -> dict:
        with self._lock:
            remotes = {
                name: {"fetches": e["fetches"], "bytes": e["bytes"], "errors": e["errors"],
                       "mean_latency_s": round(e["seconds"] / e["fetches"], 4) if e["fetches"] else None,
                       "max_latency_s": round(e["max_seconds"], 4)}
                for name, e in self._remotes.items()
            }
            return {"uptime_s": round(time.time() - self._started, 1), **self._counts, "remotes": remotes}
