"""Pipeline stages: plain functions and small classes over numpy arrays, testable without Ray."""
