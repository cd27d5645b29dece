"""Generated from ``protos/`` by ``scripts/generate_protos.py``; do not edit the ``*_pb2*`` files by hand."""
