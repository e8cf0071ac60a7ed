"""Task fine-tuning and block-aware training (launch/train.py)."""
