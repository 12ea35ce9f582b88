"""Flax modules of OpenVLA: vision towers, projector, Llama decoder and their composition."""
