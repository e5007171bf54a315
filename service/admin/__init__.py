"""Operator commands on the deployed resources, one module each: ``status`` (queue backlog),
``check`` (the preflight), ``builds`` (CodeBuild runs), ``dlq`` (list and redrive dead letters)
and ``events`` (replay an event, send a test event); ``common`` holds what they share."""

__all__ = ["build_history", "check", "common", "dlq", "events", "status"]
