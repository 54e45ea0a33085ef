"""Dataset readers: files in their official formats -> tensors. No sampling logic here."""
