"""One router per resource: jobs, datasets, models, and the health probes."""
