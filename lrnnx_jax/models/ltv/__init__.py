"""Linear time-varying models."""

__all__: list[str] = []
