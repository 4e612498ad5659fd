"""The Hyperengage client: batches, retries, bisection, rate limit."""
