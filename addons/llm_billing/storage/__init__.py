"""Storage: the database, the event journal, the usage ledger and the hot-path cache —
the only code that waits on I/O (always in the background, never on a request's path)."""
