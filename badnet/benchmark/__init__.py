"""The synthetic backdoor benchmark: generated faces, triggers and poisoning, the BadNets and
pruning-aware attacks, and the shipped nets with their data in the CSAW layout."""
