"""GaRA-SAM: gated-rank adaptation of a frozen Segment Anything Model."""
