"""Models: SAM-family backbones behind one segmenter interface, and the adapters put on them."""
