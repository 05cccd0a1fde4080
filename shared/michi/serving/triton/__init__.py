"""NVIDIA Triton execution for the listen encoder and vocoder steps: ONNX export and model
repository (export), the server the tests and local runs use (server), and the client the stages
use (client)."""
