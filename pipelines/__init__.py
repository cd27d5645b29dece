"""The retraining pipeline and how to run it: locally through ``kfp.local``, or on a Kubeflow cluster."""
