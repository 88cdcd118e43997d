"""quadnet: the textbook two-layer network that tells which quadrant a point lies in."""

__version__ = "0.1.0"
