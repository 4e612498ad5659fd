"""The local Hyperengage-compatible receiver (demo and tests), with its own copy of the
API's rules."""
