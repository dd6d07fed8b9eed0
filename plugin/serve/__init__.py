"""What users run: the OpenAI-compatible HTTP server, its schema and metrics, and the `accelserve` CLI."""
