"""Compile the gRPC protocol's .proto files into the descriptor set that evalserve loads.

    .venv/bin/python scripts/compile_protos.py          # (re)write the descriptor set
    .venv/bin/python scripts/compile_protos.py --check  # exit 1 if it differs from the .protos

evalserve ships the serialized ``FileDescriptorSet`` (app/api/grpc/protos/inference.binpb), not
generated ``_pb2.py`` modules: generated code pins the protobuf runtime to its own major version,
while a descriptor set loads on any protobuf from 4 on. Compiling needs grpcio-tools (a test
dependency); serving does not. tests/unit/test_grpc_protocol.py runs the check.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "app" / "api" / "grpc" / "protos"
SOURCES = ("grpc_predict_v2.proto", "model_repository.proto")
OUTPUT = PROTOS / "inference.binpb"


def compile_protos() -> descriptor_pb2.FileDescriptorSet:
    """The descriptor set of the .proto files, freshly compiled by grpc_tools' protoc."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "inference.binpb"
        code = protoc.main(
            ["protoc", f"--proto_path={PROTOS}", f"--descriptor_set_out={out}", *SOURCES]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def main(argv: list[str]) -> int:
    fresh = compile_protos()
    if "--check" in argv:
        committed = descriptor_pb2.FileDescriptorSet.FromString(OUTPUT.read_bytes())
        if committed != fresh:
            print(f"{OUTPUT} is stale: run {Path(__file__).name}")
            return 1
        return 0
    OUTPUT.write_bytes(fresh.SerializeToString(deterministic=True))
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
