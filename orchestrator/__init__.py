"""clorch orchestrator: experiment files, the command line, and (later) Ray sweeps and MLflow tracking."""
