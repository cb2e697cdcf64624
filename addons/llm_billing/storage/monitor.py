"""Database failures as the driver sees them, counted for the metrics.

A pymongo event listener, so no caller has to report its own errors: a command that
failed (refused, or its connection broke) and a heartbeat that found the server gone
(the database unreachable: pymongo checks every 0.5 s while an operation waits).
"""

from __future__ import annotations

from pymongo import monitoring


class DatabaseMonitor(monitoring.CommandListener, monitoring.ServerHeartbeatListener):
    def __init__(self) -> None:
        self.command_failures = 0
        self.heartbeat_failures = 0

    def failed(self, event: monitoring.CommandFailedEvent | monitoring.ServerHeartbeatFailedEvent
               ) -> None:
        if isinstance(event, monitoring.ServerHeartbeatFailedEvent):
            self.heartbeat_failures += 1
        else:
            self.command_failures += 1

    def started(self, event) -> None:
        pass

    def succeeded(self, event) -> None:
        pass
