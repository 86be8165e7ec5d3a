"""The HTTP app: REST routes, schemas, problem+json errors, the dashboard and /metrics.

Validates specs with the torch-free `tid_core.spec` and hands work to the workers through
`store.queue` by task name; it never imports torch, `worker` or the rest of `tid_core`
(import-linter contracts in pyproject.toml).
"""
