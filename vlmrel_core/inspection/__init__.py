"""Look inside one gated answer: per-layer probe scores, the answer position's attention over the image, timings.

The production gate reads one layer; the dashboard's Inspect page wants every layer and the attention map. That
view is built here (never in a page) from the gate's own model, so what is shown is what the library computes.
"""
