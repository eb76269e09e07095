"""sparse-serve: the HTTP server and its engines."""
