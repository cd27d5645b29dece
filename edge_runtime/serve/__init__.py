"""Serve step: the Open Inference Protocol over gRPC (grpc.aio), health, reflection, dynamic batching."""
