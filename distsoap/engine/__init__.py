"""The block engine: parameters as blocks, blocks stacked into buckets, SOAP on each bucket.

- :mod:`.blocks`: how a parameter is seen as a block (merged dims, which dims are rotated).
- :mod:`.bucket`: the stacked state of the same-shape blocks of one param group.
- :mod:`.step_plan`: which buckets one step touches, cached between steps.
- :mod:`.schedule`: when each block refreshes its eigenbasis (aligned or staggered).
- :mod:`.update`: the SOAP step on a stack of blocks (pure computation).
- :mod:`.block_engine`: :class:`BlockEngine`, the scheduler strategies call.
"""
