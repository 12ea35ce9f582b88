"""A small procedural tabletop world for the built-in demo and closed-loop evaluation."""
