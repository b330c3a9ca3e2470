"""What one does with an X-adapter, each a short composition of ``model`` and ``retrieval``: MLM
adaptation (train), the colour probe, GLUE fine-tuning and fill-mask."""
