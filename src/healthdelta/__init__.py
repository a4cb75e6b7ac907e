"""HealthDelta: Apple Health exports as a private, versioned, queryable health record."""

__version__ = "0.1.0"
