"""Building and training the two embedded VLMs (late fusion: LLaVA; early fusion: PaliGemma)."""
