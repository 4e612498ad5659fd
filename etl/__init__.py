"""etl: keep Hyperengage in step with your own users and workspaces tables."""

__version__ = "0.1.0"
