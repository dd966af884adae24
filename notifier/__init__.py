"""notifier: a small, Redis-backed notification service."""
