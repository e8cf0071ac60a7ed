"""Device meshes, item placement and multi-host start-up."""
