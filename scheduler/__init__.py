"""scheduler: decides what work exists (walks sources, records jobs, enqueues chunks) and the CLI."""
