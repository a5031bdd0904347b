"""`g2sd-cache verify`: checks a target or logits cache end to end without trusting it.
"""
