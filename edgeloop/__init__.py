"""edgeloop's command line and the local stand-ins (S3 server) used by the demo and the tests."""
