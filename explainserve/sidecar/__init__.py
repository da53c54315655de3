"""The gateway sidecar: the public typed gRPC Explain API in front of TorchServe."""
