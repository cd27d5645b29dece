"""NVIDIA Triton as the data plane: the supervised ``tritonserver`` and the model folders edgeloop writes
(``dataplane``), edgeloop's own C backend (``native``, sources in ``backend/``)."""
