"""The descriptor pool our generated messages live in (not protobuf's default pool; see generate_protos.py)."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
