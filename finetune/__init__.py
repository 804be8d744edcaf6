"""Make better encoders and probes (fine-tuning and linear probes; see the open issues)."""
