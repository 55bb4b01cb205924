"""The one pass: per-family adapters, model loading, per-call capture of hidden states and attention during the
answer's prefill, the run record, and the resumable extraction cache."""
