"""What runtimes and extensions talk to: Runtime API, Extensions API, Telemetry API, processes."""
