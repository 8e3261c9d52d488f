"""Data: labelled sources (`sources`) and class-incremental streams of stages (`streams`)."""
