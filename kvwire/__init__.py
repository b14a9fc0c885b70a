"""kvwire: the contract kvstore (server) and kvclient (client) both import, and which imports neither.

Generated protobuf code (v1/), the namespace (keys.py), domain enums, records and errors (types.py,
errors.py), the local-socket and UCX wire formats, shared defaults. tests/test_layering.py keeps it so.
"""
