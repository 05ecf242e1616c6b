"""The controller's view of the cluster, polled in the background for the gateway's metrics."""

from __future__ import annotations

import threading

from common import events as ev
from controlplane.client import BusClient, BusError

POLL_INTERVAL_S = 2.0


class ClusterView:
    """Asks the controller for its status every ``interval_s`` on a thread of its own (its own socket),
    so a scrape of ``/metrics`` never waits on the control bus. ``latest()`` is the last answer, or
    None before the first one or after ``2 * interval_s`` without one (stale values are not shown)."""

    def __init__(self, endpoint: str, sender: str, key_dir=None, insecure: bool = False, interval_s=POLL_INTERVAL_S):
        self.endpoint, self.sender, self.key_dir, self.insecure = endpoint, sender, key_dir, insecure
        self.interval_s = interval_s
        self._latest: ev.StatusReply | None = None
        self._misses = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-view", daemon=True)

    def start(self) -> ClusterView:
        self._thread.start()
        return self

    def latest(self) -> ev.StatusReply | None:
        return self._latest

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval_s + 2.0)

    def _run(self) -> None:
        with BusClient(
            self.endpoint, sender=self.sender, key_dir=self.key_dir, insecure=self.insecure, timeout_s=self.interval_s
        ) as bus:
            while not self._stop.is_set():
                try:
                    self._latest, self._misses = bus.request(ev.StatusRequest), 0
                except BusError:
                    self._misses += 1
                    if self._misses >= 2:
                        self._latest = None
                self._stop.wait(self.interval_s)
