"""Turning labelled text and a base model into an early-exit bundle."""
