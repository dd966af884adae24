"""HTTP API blueprints, one per area."""
