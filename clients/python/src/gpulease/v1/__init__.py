"""The code generated from proto/gpulease/v1/lease.proto by generate.py.

Do not edit `lease_pb2.py`, `lease_pb2.pyi` or `lease_pb2_grpc.py`: change
the proto and run ``python clients/python/generate.py``.
"""
