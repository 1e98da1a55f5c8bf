"""Guest image builders: small, reproducible disk images hvstack boots in its own tests.

Contract: :mod:`hvstack.images.catalog` names the images that can be built
(``tiny``) and builds one by name into a cache folder; each builder returns the path
of a finished image file and never leaves a partial one in the cache. Builders use
host tools on image files only (no mounts, no loop devices, nothing installed on the
host) and raise :class:`~hvstack.errors.HypervisorError` when a tool is missing.
"""
