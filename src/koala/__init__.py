"""koala-fl: federated knowledge transfer from small client models to a large server model."""

__version__ = "0.1.0"
