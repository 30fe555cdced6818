"""The Open Inference Protocol over gRPC (KServe v2 / Triton's ``inference.GRPCInferenceService``),
beside REST and sharing its batchers: ``messages`` (classes from the shipped descriptor set),
``codec`` (messages to the values REST /v2 uses) and ``service`` (the handlers and the server)."""
