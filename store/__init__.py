"""The state every service process shares: settings, the SQL database (models, sessions,
migrations, job transitions), API keys and the task queue.

The API, the worker, the reconciler and the `tid` command all import it; it imports none of
them, nor torch (import-linter contracts in pyproject.toml).
"""
