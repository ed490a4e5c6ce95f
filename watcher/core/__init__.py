"""What a branch is and what changed in it: the rules, the lower stack, mounts, exports.

No asyncio, no event loop; imports nothing above it.
"""
